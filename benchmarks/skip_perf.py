"""Benchmark of dynamic expert skipping: MoE block time and output tokens/s with 0 / 25 / 50 % of the
non-top-1 pairs skipped, on a dense and a compressed model, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/skip_perf.py --out /tmp/skip/perf [--layers 1] [--rounds 5]

Models: a random model with Qwen3-30B-A3B layer shapes (offline.fixtures.bench_shapes: H 2048, 128 experts
of I 768, top-8, bf16) and a compressed copy of it with 40 % of the expert parameters removed by neuron
selection (the committed default's shape at 40 %; random factors, benchmarks/synthetic_compressed.py: speed
does not depend on the values). Each gets a skipping block (`with_skipping`) and is served by one vLLM
engine (in-process `vllm.LLM`, eager), one model after the other, each in its own subprocess.

Inside the worker (benchmarks/perf_worker.py's timing) the first MoE block is timed at 1, 32 and 512
tokens in arms: "off" (vLLM's own path, no skipping code) and skip fractions 0 / 25 / 50 % of the
non-top-1 pairs (beta set per arm to that quantile of the block's own routing on the timed hidden states,
so the fraction is exact whatever the random router does). Every round runs every arm, the order reversed
on every other round; a round gives one paired speed-up per arm (median "off" call / median arm call of
that round). Reported: the median over rounds with the [min-max] of the per-round speed-ups, and
"no difference within the noise" when that range covers 1.0 (serve/ab_stats.py). Output tokens/s at batch 1
and 32 (greedy, 32 new tokens, ignore_eos) are measured the same way, with the 512-token betas on every MoE
layer; their skip fraction is what the plugin's pair counter recorded during those generations.
Writes DIR/skip_perf.json and prints one line per arm.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARMS = ("off", 0.0, 0.25, 0.5)
TOKENS = (1, 32, 512)
BATCHES = (1, 32)
NEW_TOKENS = 32
COMPRESSED_RATIO = 0.4


def with_skipping(model_dir: Path, out: Path) -> Path:
    """`model_dir` with a skipping block added (tensors linked, not copied): the checkpoint's own `moe_svd`
    block gets `skipping`, a dense checkpoint gets a skip-only block."""
    from moesvd_vllm.architectures import moe_layer_indices
    from moesvd_vllm.format.directories import read_config, write_config
    from moesvd_vllm.format.schema import CONFIG_KEY, SKIPPING_FORMAT_VERSION, MoESVDConfig, SkippingSpec
    from moesvd_vllm.format.writer import moe_svd_block, plugin_architectures

    config = read_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "config.json" and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    betas = {str(i): 1e-6 for i in moe_layer_indices(config)}  # the method is installed; each arm sets beta
    skipping = SkippingSpec(betas=betas, selection="fixed")
    if CONFIG_KEY in config:
        block = dataclasses.replace(MoESVDConfig.from_dict(config[CONFIG_KEY]), skipping=skipping,
                                    format_version=SKIPPING_FORMAT_VERSION)
        config = dict(config, **{CONFIG_KEY: block.to_dict()})
    else:
        block = moe_svd_block(config, "skip-only", {}, {}, None, skipping)
        config = dict(config, architectures=plugin_architectures(config), **{CONFIG_KEY: block.to_dict()})
    write_config(out, config)
    return out


def _skipping_methods(worker) -> list:
    """The fused-MoE methods of every MoE block (dense layers: SkippingUnquantizedMethod `.beta`;
    compressed ones: SharedBasisExperts `.skip_beta`)."""
    from benchmarks.perf_worker import _model, moe_blocks

    methods = []
    for index, block in moe_blocks(_model(worker)):
        experts = block.experts
        method = getattr(getattr(experts, "routed_experts", experts), "quant_method", None)
        if not (hasattr(method, "beta") or hasattr(method, "skip_beta")):
            raise RuntimeError(f"layer {index}: no skipping method ({type(method).__name__})")
        methods.append(method)
    return methods


def set_beta(worker, beta: float) -> tuple[int, int]:
    """Set beta on every MoE layer; returns the pair counter's (routed, skipped) totals so far."""
    from moesvd_vllm.skip_stats import PairCounter

    for method in _skipping_methods(worker):
        setattr(method, "beta" if hasattr(method, "beta") else "skip_beta", beta)
    totals = PairCounter.get().totals
    return int(totals[0]), int(totals[1])


def _round_orders(arms, rounds: int) -> list[list]:
    return [list(arms) if r % 2 == 0 else list(reversed(arms)) for r in range(rounds)]


def time_skipping(worker, token_counts, arms, rounds: int, repeats: int, seed: int = 0) -> dict:
    """In the worker: {tokens: {"seconds": {arm: [[seconds per call] per round]}, ...}} of the first block."""
    from benchmarks.perf_worker import _hidden_size, _hidden_states, _model, _timed_calls, moe_blocks

    _, block = moe_blocks(_model(worker))[0]
    hidden = _hidden_size(worker)
    top_k = worker.vllm_config.model_config.hf_text_config.num_experts_per_tok
    result: dict = {}
    for tokens in token_counts:
        states = _hidden_states(block, tokens, hidden, seed + tokens)
        with torch.inference_mode():
            logits = block.gate(states)  # vLLM's linear (its weight is prepacked on CPU)
            logits = (logits[0] if isinstance(logits, tuple) else logits).float()
            top, ids = logits.softmax(-1).topk(top_k, -1)
        ratios = (top[:, 1:] / top[:, :1]).reshape(-1).double()
        betas = {arm: 0.0 if arm == "off" else
                 (1e-9 if arm == 0.0 else float(torch.quantile(ratios, arm)) + 1e-7) for arm in arms}
        kept = {str(arm): top >= betas[arm] * top[:, :1] for arm in arms}
        measured = {str(arm): [] for arm in arms}
        for order in _round_orders(arms, rounds):
            for arm in order:
                set_beta(worker, betas[arm])
                measured[str(arm)].append(_timed_calls(worker, block, states, repeats, 1))
        set_beta(worker, 0.0)
        result[tokens] = {"seconds": measured, "beta": {str(a): b for a, b in betas.items()},
                          "skip_fraction": {str(a): float((ratios < betas[a]).double().mean()) for a in arms},
                          # the bounds: weight bytes read scale with the experts touched, compute with pairs
                          "touched_experts": {a: int(ids[k].unique().numel()) for a, k in kept.items()},
                          "pairs": {a: int(k.sum()) for a, k in kept.items()}}
    return result


def paired_speedups(rounds_by_arm: dict[str, list[list[float]]], higher_is_faster: bool = False) -> dict:
    """Per arm: median [min-max] over rounds of the per-round speed-up against "off", with the verdict."""
    from serve.ab_stats import interval_coverage, verdict

    base = [statistics.median(r) for r in rounds_by_arm["off"]]
    out = {}
    for arm, rounds in rounds_by_arm.items():
        values = [statistics.median(r) for r in rounds]
        ratios = [(v / b) if higher_is_faster else (b / v) for b, v in zip(base, values)]
        flat = [x for r in rounds for x in r]
        out[arm] = {"median": statistics.median(flat), "min": min(flat), "max": max(flat),
                    "speedup": statistics.median(ratios), "speedup_low": min(ratios),
                    "speedup_high": max(ratios), "per_round": ratios,
                    "verdict": None if arm == "off" else verdict(min(ratios), max(ratios), True),
                    "coverage": interval_coverage(len(ratios))}
    return out


def generation_speed(llm, betas: dict[str, float], rounds: int, top_k: int, vocab: int) -> dict:
    """Output tokens/s per arm at each batch size (rounds alternate the arm order), with skip fractions."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    result = {}
    for batch in BATCHES:
        prompts = [{"prompt_token_ids": torch.randint(0, vocab, (16,), generator=generator).tolist()}
                   for _ in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        rates = {arm: [] for arm in betas}
        counted = {arm: [0, 0] for arm in betas}
        for order in _round_orders(list(betas), rounds):
            for arm in order:
                before = llm.collective_rpc(set_beta, args=(betas[arm],))[0]
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - started
                after = llm.collective_rpc(set_beta, args=(betas[arm],))[0]
                rates[arm].append([sum(len(o.outputs[0].token_ids) for o in outputs) / seconds])
                counted[arm][0] += after[0] - before[0]
                counted[arm][1] += after[1] - before[1]
        rows = paired_speedups(rates, higher_is_faster=True)
        for arm, (routed, skipped) in counted.items():  # share of the non-top-1 pairs skipped
            rows[arm]["skip_fraction"] = skipped / (routed * (top_k - 1) / top_k) if routed else 0.0
        result[str(batch)] = rows
    return result


def profile_arms(llm, betas: dict[str, float], tokens: int) -> dict:
    """torch.profiler self time per operator of the block at `tokens` tokens, without and with 50 % skipped:
    the fused-MoE kernel's own time is where the skipped pairs must show."""
    from benchmarks.perf_worker import profile_moe_block

    out = {}
    for arm in ("off", "0.5"):
        llm.collective_rpc(set_beta, args=(betas[arm],))
        profile = llm.collective_rpc(profile_moe_block, args=(tokens, 3))[0]
        out[arm] = {"total_ms": profile["total_ms"], "operators": profile["operators"][:6]}
    llm.collective_rpc(set_beta, args=(0.0,))
    return out


def measure(model: Path, rounds: int, repeats: int) -> dict:
    """One engine on `model`: the block timings and the generation speeds."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(model=str(model), enforce_eager=True, dtype="bfloat16", max_model_len=1024,
              max_num_batched_tokens=1024, max_num_seqs=32)
    text_config = llm.llm_engine.model_config.hf_text_config
    started = time.time()
    timed = llm.collective_rpc(time_skipping, args=(list(TOKENS), list(ARMS), rounds, repeats))[0]
    report = {"block": {}, "rounds": rounds, "repeats": repeats}
    for tokens, data in timed.items():
        rows = paired_speedups({arm: [[1e3 * s for s in r] for r in rounds]  # ms
                                for arm, rounds in data["seconds"].items()})
        for arm, row in rows.items():
            row.update(skip_fraction=data["skip_fraction"][arm], beta=data["beta"][arm],
                       touched_experts=data["touched_experts"][arm], pairs=data["pairs"][arm],
                       touched_bytes_bound=data["touched_experts"]["off"] / data["touched_experts"][arm],
                       pair_bound=data["pairs"]["off"] / data["pairs"][arm])
        report["block"][str(tokens)] = rows
    betas = timed[max(TOKENS)]["beta"]
    report["profile"] = profile_arms(llm, betas, max(TOKENS))
    report["generation"] = generation_speed(llm, betas, rounds, text_config.num_experts_per_tok,
                                            text_config.vocab_size)
    report["wall_s"] = time.time() - started
    return report


def _describe(row: dict, unit: str) -> str:
    text = f"{row['median']:9.2f} {unit} [{row['min']:.2f}-{row['max']:.2f}]"
    if row["verdict"] is None:
        return text
    text = (f"{text}  x{row['speedup']:.2f} [{row['speedup_low']:.2f}-{row['speedup_high']:.2f}] "
            f"{row['verdict']}  skip {row['skip_fraction']:.3f}")
    if "pair_bound" in row:
        text += f"  bounds: bytes x{row['touched_bytes_bound']:.2f}, pairs x{row['pair_bound']:.2f}"
    return text


def print_report(label: str, report: dict) -> None:
    for tokens, rows in report["block"].items():
        for arm, row in rows.items():
            print(f"{label:10s} block {int(tokens):4d} tokens  arm {arm:>5}: {_describe(row, 'ms')}")
    for batch, rows in report["generation"].items():
        for arm, row in rows.items():
            print(f"{label:10s} tok/s batch {int(batch):3d}    arm {arm:>5}: {_describe(row, 'tok/s')}")
    for arm, profile in report["profile"].items():
        top = ", ".join(f"{op['name']} {op['self_ms']:.1f}" for op in profile["operators"][:3])
        print(f"{label:10s} profile {int(max(TOKENS))} tokens arm {arm:>5}: {profile['total_ms']:.1f} ms ({top})")


def build_models(out: Path, layers: int) -> dict[str, Path]:
    from benchmarks.perf_models import synthetic_compressed_model
    from offline.fixtures.bench_shapes import build_bench_model

    dense = out / "dense"
    if not (dense / "config.json").exists():
        build_bench_model("qwen3-30b-a3b", dense, layers=layers, dtype="bfloat16")
    compressed = synthetic_compressed_model(dense, out / "compressed-40", COMPRESSED_RATIO, "bfloat16", 0,
                                            neurons=True)
    return {"dense": with_skipping(dense, out / "dense-skip"),
            "compressed": with_skipping(compressed, out / "compressed-40-skip")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this model, print JSON
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.one:
        (out / "one.json").write_text(json.dumps(measure(Path(args.one), args.rounds, args.repeats)))
        return 0
    reports = {}
    for label, model in build_models(out, args.layers).items():
        subprocess.run([sys.executable, __file__, "--out", str(out), "--one", str(model), "--rounds",
                        str(args.rounds), "--repeats", str(args.repeats)], check=True)
        reports[label] = json.loads((out / "one.json").read_text())
        print_report(label, reports[label])
    (out / "skip_perf.json").write_text(json.dumps({"models": reports, "machine": _machine()}, indent=1))
    return 0


def _machine() -> dict:
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {"cpus": os.cpu_count(), "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "avx512f": "avx512f" in flags, "load_average": os.getloadavg()}


if __name__ == "__main__":
    raise SystemExit(main())
