"""Benchmark of dynamic expert skipping: MoE block time with 0 / 25 / 50 % of the non-top-1 pairs skipped.

    PYTHONPATH=. .venv/bin/python benchmarks/skip_perf.py --out /tmp/skip/perf [--layers 1] [--rounds 5]

One vLLM engine (in-process `vllm.LLM`, eager) serves a skip-only copy of a random model with
Qwen3-30B-A3B layer shapes (offline.fixtures.bench_shapes: H 2048, 128 experts of I 768, top-8, bf16).
Inside the worker (benchmarks/perf_worker.py's timing) the first MoE block is timed at 1, 32 and 512
tokens in arms, alternating in every round: "off" (vLLM's own path, no skipping code), and skip fractions
0 / 25 / 50 % of the non-top-1 pairs (beta set per arm to that quantile of the block's own routing on the
timed hidden states, so the fraction is exact whatever the random router does). Writes DIR/skip_perf.json
and prints median [min-max] per arm with the speed-up against "off".
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ARMS = ("off", 0.0, 0.25, 0.5)
TOKENS = (1, 32, 512)


def skip_only_copy(dense_dir: Path, out: Path) -> Path:
    """`dense_dir` with the plugin architecture and a skipping block (tensors linked, not copied)."""
    from moesvd_vllm.architectures import moe_layer_indices
    from moesvd_vllm.format.directories import read_config, write_config
    from moesvd_vllm.format.schema import CONFIG_KEY, SkippingSpec
    from moesvd_vllm.format.writer import moe_svd_block, plugin_architectures

    config = read_config(dense_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in dense_dir.iterdir():
        if item.name != "config.json" and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    betas = {str(i): 1e-6 for i in moe_layer_indices(config)}  # the method is installed; each arm sets beta
    block = moe_svd_block(config, "skip-only", {}, {}, None, SkippingSpec(betas=betas, selection="fixed"))
    config = dict(config, architectures=plugin_architectures(config), **{CONFIG_KEY: block.to_dict()})
    write_config(out, config)
    return out


def time_skipping(worker, token_counts, arms, rounds: int, repeats: int, seed: int = 0) -> dict:
    """In the worker: {tokens: {arm: [seconds per call]}} of the first MoE block (arms alternate)."""
    from benchmarks.perf_worker import _hidden_size, _hidden_states, _model, _timed_calls, moe_blocks

    index, block = moe_blocks(_model(worker))[0]
    method = block.experts.routed_experts.quant_method if hasattr(block.experts, "routed_experts") else None
    if method is None or not hasattr(method, "beta"):
        raise RuntimeError(f"layer {index}: no skipping method ({type(method).__name__})")
    hidden = _hidden_size(worker)
    result: dict = {}
    for tokens in token_counts:
        states = _hidden_states(block, tokens, hidden, seed + tokens)
        with torch.inference_mode():
            logits = block.gate(states)  # vLLM's linear (its weight is prepacked on CPU)
            logits = (logits[0] if isinstance(logits, tuple) else logits).float()
            top_k = worker.vllm_config.model_config.hf_text_config.num_experts_per_tok
            top = logits.softmax(-1).topk(top_k, -1).values
        ratios = (top[:, 1:] / top[:, :1]).reshape(-1).double()
        betas = {arm: 0.0 if arm == "off" else
                 (1e-9 if arm == 0.0 else float(torch.quantile(ratios, arm)) + 1e-7) for arm in arms}
        measured = {str(arm): [] for arm in arms}
        fractions = {str(arm): float((ratios < betas[arm]).double().mean()) for arm in arms}
        for _ in range(rounds):
            for arm in arms:
                method.beta = betas[arm]
                measured[str(arm)] += _timed_calls(worker, block, states, repeats, 1)
        method.beta = 0.0
        result[tokens] = {"seconds": measured, "skip_fraction": fractions,
                          "beta": {str(a): b for a, b in betas.items()}}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    dense = out / "dense"
    if not (dense / "config.json").exists():
        from offline.fixtures.bench_shapes import build_bench_model

        build_bench_model("qwen3-30b-a3b", dense, layers=args.layers, dtype="bfloat16")
    model = skip_only_copy(dense, out / "skip-only")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(model=str(model), enforce_eager=True, dtype="bfloat16", max_model_len=1024,
              max_num_batched_tokens=1024)
    started = time.time()
    result = llm.collective_rpc(time_skipping, args=(list(TOKENS), list(ARMS), args.rounds, args.repeats))[0]
    report = {"tokens": {}, "rounds": args.rounds, "repeats": args.repeats, "wall_s": time.time() - started}
    for tokens, data in result.items():
        base = statistics.median(data["seconds"]["off"])
        rows = {}
        for arm, values in data["seconds"].items():
            rows[arm] = {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values),
                         "max_ms": 1e3 * max(values), "speedup_vs_off": base / statistics.median(values),
                         "skip_fraction": data["skip_fraction"][arm], "beta": data["beta"][arm]}
            print(f"{tokens:4d} tokens  arm {arm:>5}: {rows[arm]['median_ms']:8.2f} ms "
                  f"[{rows[arm]['min_ms']:.2f}-{rows[arm]['max_ms']:.2f}]  x{rows[arm]['speedup_vs_off']:.2f}  "
                  f"skip {rows[arm]['skip_fraction']:.3f}")
        report["tokens"][str(tokens)] = rows
    (out / "skip_perf.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
