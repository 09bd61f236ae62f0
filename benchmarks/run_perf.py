"""Performance benchmark: does the compressed model serve faster than the dense one in vLLM?

    .venv/bin/python benchmarks/run_perf.py --shape qwen3-30b-a3b --layers 4 --ratios 0.2,0.4,0.6 --out DIR
    .venv/bin/python benchmarks/run_perf.py --ratios 0.4 --neuron-ratios 0.4 --no-served --out DIR
    .venv/bin/python benchmarks/run_perf.py --tiny --out DIR          # CI: tiny model, 1 layer, seconds

Steps, all in one run:
1. build the dense benchmark model (random weights, real layer shapes: offline.fixtures.bench_shapes);
2. compressed versions at each ratio: by default random factors at the ratio's uniform rank
   (benchmarks/synthetic_compressed.py: serving speed does not depend on the values, and the real
   compressor's RAM would not fit several 128-expert layers on a small machine), and one real
   `moesvd compress` run on a 1-layer model of the same shape for the compression cost (wall time,
   peak RSS); `--compressor moesvd` compresses every ratio with the real compressor instead;
   `--neuron-ratios` adds neuron-selection models (format v2: I' = the multiple of 8 nearest
   (1 - ratio) I neurons per expert, r = H, no bases; always synthetic), labelled "RATIO-neurons";
   `--expert-bases-ratios` adds models with every expert's own bases (format v4, basis_groups = E: the
   uniform rank with r (2 E H + 3 E I) = (1 - ratio) 3 E I H; always synthetic), "RATIO-expert-bases";
3. offline, in-process vLLM engines, the dense one and one compressed one alive together, measured in
   alternating order: output tok/s at batch 1/8/32, MoE-block time at 1/32/512 tokens inside the worker
   (benchmarks/perf_worker.py), resident expert weights vs the checkpoint's ParamCounts, a torch
   profile of the block;
4. served: vLLM OpenAI servers (serve.launch) for dense and compressed, compared with `moesvd ab`
   (serve.ab: vllm bench serve metrics, arms alternating);
5. prints the ratio table and writes DIR/perf.json and DIR/perf.md.

Ratios are fractions of routed-expert parameters REMOVED (ParamCounts.ratio): 0.4 keeps 60 %.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import dataclasses
import datetime as dt
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import perf_models, perf_offline, perf_report
from benchmarks.perf_models import CompressSpec, ModelSpec
from benchmarks.perf_offline import EngineResult, OfflineOptions

logger = logging.getLogger("benchmarks.run_perf")


@dataclass(frozen=True)
class Variant:
    """One compressed model: a ratio, the dtype of its shared bases, and how the ratio is reached (a lower
    rank, or `neurons`: fewer intermediate neurons at full rank without bases)."""

    ratio: float
    basis_dtype: str
    neurons: bool = False
    expert_bases: bool = False  # every expert its own bases (format version 4, basis_groups = E)

    @property
    def label(self) -> str:
        if self.neurons:
            return f"{self.ratio:g}-neurons"
        if self.expert_bases:
            return f"{self.ratio:g}-expert-bases"
        return f"{self.ratio:g}" if self.basis_dtype == "bfloat16" else f"{self.ratio:g}-{self.basis_dtype}"


@dataclass(frozen=True)
class ServedOptions:
    ratios: tuple[float, ...] = (0.4,)  # which compressed models get a served A/B (each costs 2 loads)
    concurrency: tuple[int, ...] = (1, 8, 32)
    num_prompts: int = 32
    max_tokens: int = 64
    words_per_prompt: int = 48


@dataclass(frozen=True)
class PerfOptions:
    out: Path
    model: ModelSpec
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6)
    basis_dtype: str = "bfloat16"
    extra_basis_dtype: str | None = None  # also measure these ratios with bases in this dtype ...
    extra_basis_ratios: tuple[float, ...] = ()  # ... (e.g. float32 at 0.4)
    neuron_ratios: tuple[float, ...] = ()  # also neuron-selection models (I' < I, r = H, no bases) at these
    expert_bases_ratios: tuple[float, ...] = ()  # also per-expert-bases models (basis_groups = E) at these
    compress_samples: int = 16
    compress_seq_len: int = 128
    ratio_tolerance: float = 0.01
    compressor: str = "synthetic"  # "synthetic" (random factors, speed only) or "moesvd" (moesvd compress)
    cost_ratio: float | None = 0.4  # one real `moesvd compress` run on a small model, for its cost
    cost_layers: int = 1
    cost_experts: int | None = None  # None: the shape's expert count
    offline: OfflineOptions = field(default_factory=OfflineOptions)
    served: ServedOptions | None = field(default_factory=ServedOptions)
    reuse_models: bool = True


# ---------------------------------------------------------------- models


def variants(options: PerfOptions) -> list[Variant]:
    out = [Variant(ratio, options.basis_dtype) for ratio in options.ratios]
    if options.extra_basis_dtype:
        out += [Variant(ratio, options.extra_basis_dtype) for ratio in options.extra_basis_ratios]
    out += [Variant(ratio, options.basis_dtype, neurons=True) for ratio in options.neuron_ratios]
    out += [Variant(ratio, options.basis_dtype, expert_bases=True) for ratio in options.expert_bases_ratios]
    return out


def build_models(options: PerfOptions) -> tuple[Path, dict[Variant, Path], list[dict]]:
    models_dir = options.out / "models"
    dense = perf_models.build_dense_model(options.model, models_dir / "dense")
    compressed, costs = {}, []
    for variant in variants(options):
        target = models_dir / f"compressed-{variant.label}"
        if options.compressor == "synthetic" or variant.neurons or variant.expert_bases:  # always synthetic
            compressed[variant] = perf_models.synthetic_compressed_model(
                dense, target, variant.ratio, variant.basis_dtype, options.model.seed, neurons=variant.neurons,
                expert_bases=variant.expert_bases)
            continue
        path, cost = perf_models.compress_model(dense, target, _compress_spec(options, variant),
                                                reuse=options.reuse_models)
        compressed[variant] = path
        if cost is not None:
            costs.append(dataclasses.asdict(cost))
    return dense, compressed, costs


def _compress_spec(options: PerfOptions, variant: Variant) -> CompressSpec:
    return CompressSpec(ratio=variant.ratio, basis_dtype=variant.basis_dtype, num_samples=options.compress_samples,
                        seq_len=options.compress_seq_len, ratio_tolerance=options.ratio_tolerance)


def measure_compression_cost(options: PerfOptions) -> list[dict]:
    """`moesvd compress` on a small model of the same shape (cost_layers layers, cost_experts experts)."""
    if options.cost_ratio is None:
        return []
    spec = dataclasses.replace(options.model, layers=options.cost_layers, num_experts=options.cost_experts)
    models_dir = options.out / "models"
    dense = perf_models.build_dense_model(spec, models_dir / "cost-dense")
    _, cost = perf_models.compress_model(dense, models_dir / "cost-compressed",
                                         _compress_spec(options, Variant(options.cost_ratio, options.basis_dtype)),
                                         reuse=False)
    return [dataclasses.asdict(cost)]


# ---------------------------------------------------------------- offline


def run_offline(dense_dir: Path, compressed: dict[Variant, Path], options: OfflineOptions) -> dict:
    """Dense engine up throughout; each compressed engine alternates with it, then is stopped."""
    perf_offline.prepare_environment(options)
    dense_llm, dense_load = perf_offline.start_engine(dense_dir, options)
    perf_offline.warm_up(dense_llm, options)
    dense_info = EngineResult(str(dense_dir), dense_load)
    perf_offline.describe(dense_llm, dense_info, options)
    pairs = []
    try:
        for variant, path in compressed.items():
            name = f"compressed-{variant.label}"
            llm, load = perf_offline.start_engine(path, options)
            try:
                perf_offline.warm_up(llm, options)
                engines = {"dense": (dense_llm, EngineResult(str(dense_dir), dense_load)),
                           name: (llm, EngineResult(str(path), load))}
                perf_offline.alternate(engines, options)
                perf_offline.describe(llm, engines[name][1], options)
                pairs.append({"variant": variant.label, "ratio": variant.ratio, "basis_dtype": variant.basis_dtype,
                              "neurons": variant.neurons, "expert_bases": variant.expert_bases,
                              "dense": dataclasses.asdict(engines["dense"][1]),
                              "compressed": dataclasses.asdict(engines[name][1])})
            finally:
                perf_offline.stop_engine(llm)
    finally:
        perf_offline.stop_engine(dense_llm)
    return {"dense": dataclasses.asdict(dense_info), "pairs": pairs}


# ---------------------------------------------------------------- served


def run_served(dense_dir: Path, compressed: dict[Variant, Path], options: ServedOptions,
               offline: OfflineOptions, out: Path) -> list[dict]:
    """`moesvd ab` between a dense and a compressed vLLM server, one compressed server at a time."""
    from serve.ab import ABOptions, run_ab
    from serve.launch import ServerOptions, VLLMServer

    def server(path: Path, name: str) -> VLLMServer:
        return VLLMServer(ServerOptions(
            model=str(path), served_model_name=name, dtype=offline.dtype, enforce_eager=offline.enforce_eager,
            max_model_len=offline.max_model_len, log_path=str(out / f"server-{name}.log"),
            extra_args=["--max-num-seqs", str(max(options.concurrency))],
            env={"VLLM_CPU_KVCACHE_SPACE": str(offline.kv_cache_gib)}))

    results = []
    with server(dense_dir, "dense") as dense_server:
        for variant, path in compressed.items():
            if variant.neurons or variant.expert_bases or variant.ratio not in options.ratios or variant.basis_dtype != "bfloat16" and any(
                    v.ratio == variant.ratio and v.basis_dtype == "bfloat16" for v in compressed):
                continue  # one served A/B per ratio (rank reduction, the default bases)
            ratio, name = variant.ratio, f"compressed-{variant.label}"
            with server(path, name) as compressed_server:
                report = run_ab(ABOptions(
                    a_url=dense_server.base_url, b_url=compressed_server.base_url, a_model="dense",
                    b_model=name, concurrency=options.concurrency, num_prompts=options.num_prompts,
                    max_tokens=options.max_tokens, words_per_prompt=options.words_per_prompt, quality=False,
                    out=out / f"ab-{ratio:g}", plots=False, show_progress=False))
                results.append({"variant": variant.label, "ratio": ratio, "startup_s": {"dense": dense_server.startup_seconds,
                                                              name: compressed_server.startup_seconds},
                                "speed": report.speed, "problems": report.problems})
    return results


# ---------------------------------------------------------------- summary


def _weights_summary(engine: dict, promised: dict, compressed: bool,
                     geometry: perf_report.ModelGeometry | None = None) -> dict:
    """Resident expert parameters vs the checkpoint's ParamCounts (the schema's decomposed_layer_params),
    and vs the same count with I' padded as vLLM's kernel holds it (`geometry`)."""
    resident = engine["weights"]["expert_params"]
    target = promised["expert_compressed"] if compressed else promised["expert_dense"]
    padded = target if geometry is None else geometry.padded().compressed_params()
    return {"promised": target, "resident": resident, "deviation": resident / target - 1.0,
            "padded_expected": padded, "deviation_from_padded": resident / padded - 1.0,
            "resident_bytes": engine["weights"]["expert_bytes"],
            "worker_rss_bytes": engine["weights"]["worker_rss_bytes"]}


def _pair_rows(pair: dict, geometry: perf_report.ModelGeometry, served: dict | None,
               offline: OfflineOptions) -> list[dict]:
    dense, comp = pair["dense"], pair["compressed"]
    rows = []
    for tokens in offline.block_tokens:
        bound = geometry.flop_bound() if tokens >= 256 else geometry.touched_bytes_bound(tokens)
        d, c = perf_report.median(dense["block_ms"].get(tokens)), perf_report.median(comp["block_ms"].get(tokens))
        rows.append({"metric": f"MoE block ms @{tokens} tok", "dense": d, "compressed": c, "bound": bound,
                     "speedup": perf_report.speedup(d, c, higher_is_better=False)})
    for batch in offline.batch_sizes:
        d = perf_report.median(dense["throughput"].get(batch))
        c = perf_report.median(comp["throughput"].get(batch))
        rows.append({"metric": f"offline out tok/s @batch {batch}", "dense": d, "compressed": c,
                     "speedup": perf_report.speedup(d, c, higher_is_better=True)})
    for level in (served or {}).get("speed", []):
        a, b = level["A"], level["B"]
        conc = level["max_concurrency"]
        rows.append({"metric": f"served out tok/s @conc {conc}", "dense": a["output_throughput"],
                     "compressed": b["output_throughput"],
                     "speedup": perf_report.speedup(a["output_throughput"], b["output_throughput"],
                                                    higher_is_better=True)})
        for key in ("mean_ttft_ms", "mean_itl_ms"):
            rows.append({"metric": f"served {key} @conc {conc}", "dense": a[key], "compressed": b[key],
                         "speedup": perf_report.speedup(a[key], b[key], higher_is_better=False)})
    return rows


def summarize(dense_dir: Path, compressed: dict[Variant, Path], offline: dict, served: list[dict],
              options: PerfOptions) -> dict:
    dims = perf_models.dense_dims(dense_dir)
    dense_promised = perf_models.promised_params(dense_dir)
    summary = {"pairs": [], "dense_weights": _weights_summary(offline["dense"], dense_promised, False)}
    served_by_variant = {s["variant"]: s for s in served}
    paths = {variant.label: path for variant, path in compressed.items()}
    for pair in offline["pairs"]:
        path = paths[pair["variant"]]
        promised = perf_models.promised_params(path)
        specs = list(perf_models.layer_specs(path).values())
        geometry = perf_report.ModelGeometry.from_specs(dims, specs)
        summary["pairs"].append({
            "variant": pair["variant"], "ratio": pair["ratio"], "basis_dtype": pair["basis_dtype"],
            "neurons": pair.get("neurons", False), "expert_bases": pair.get("expert_bases", False), "rank": max(promised["ranks"].values()),
            "intermediate": max(spec.kept_intermediate(dims) for spec in specs),
            "bases": any(spec.bases for spec in specs), "shape": perf_report.layer_shape_label(dims, specs),
            "achieved_ratio": promised["ratio"], "ideal_bytes_ratio": geometry.bytes_ideal(),
            "padded_ideal_bytes_ratio": geometry.padded().bytes_ideal(),
            "weights": _weights_summary(pair["compressed"], promised, True, geometry),
            "rows": _pair_rows(pair, geometry, served_by_variant.get(pair["variant"]), options.offline)})
    return summary


def render(summary: dict, results: dict) -> str:
    parts = ["## Compressed / dense, measured side by side", ""]
    parts.append(perf_report.markdown_table(*perf_report.ratio_rows(summary)))
    parts += ["", "## Resident routed-expert weights (vLLM worker) vs checkpoint ParamCounts", ""]
    parts.append(perf_report.markdown_table(*perf_report.weight_rows(summary)))
    if results.get("compression"):
        parts += ["", "## Compression cost (`moesvd compress`, child process)", ""]
        parts.append(perf_report.markdown_table(*perf_report.compression_rows(results["compression"])))
    profiles = {"dense": results["offline"]["dense"]["profiles"]}
    for pair in results["offline"]["pairs"]:
        profiles[f"compressed-{pair['variant']}"] = pair["compressed"]["profiles"]
    parts += ["", "## Where the MoE block's time goes (torch profiler, self CPU time per call)", ""]
    parts.append(perf_report.markdown_table(*perf_report.profile_rows(profiles)))
    return "\n".join(parts) + "\n"


def _environment() -> dict:
    import torch

    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - informational
        vllm_version = "unknown"
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
            "torch": torch.__version__, "vllm": vllm_version,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": bool(torch.cpu._is_amx_tile_supported())}


def run(options: PerfOptions) -> dict:
    options.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    dense_dir, compressed, costs = build_models(options)
    if options.compressor == "synthetic":
        costs = measure_compression_cost(options)
    offline = run_offline(dense_dir, compressed, options.offline)
    served = (run_served(dense_dir, compressed, options.served, options.offline, options.out)
              if options.served else [])
    results = {"environment": _environment(), "options": _jsonable(dataclasses.asdict(options)),
               "compression": costs, "offline": offline, "served": served}
    (options.out / "perf-raw.json").write_text(json.dumps(results, indent=1, default=str))  # kept if summary fails
    results["summary"] = summarize(dense_dir, compressed, offline, served, options)
    results["duration_s"] = time.monotonic() - started
    text = render(results["summary"], results)
    (options.out / "perf.json").write_text(json.dumps(results, indent=1, default=str))
    (options.out / "perf.md").write_text(text)
    print(text)
    logger.info("wrote %s and %s (%.0f s)", options.out / "perf.json", options.out / "perf.md",
                results["duration_s"])
    return results


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ---------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> PerfOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (models, logs, results)")
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=("qwen3-30b-a3b", "mixtral-8x7b"))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the benchmark model")
    parser.add_argument("--ratios", type=_floats, default=(0.2, 0.4, 0.6),
                        help="fractions of expert parameters removed (default 0.2,0.4,0.6)")
    parser.add_argument("--basis-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--extra-basis-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="also measure --extra-basis-ratios with the shared bases in this dtype")
    parser.add_argument("--extra-basis-ratios", type=_floats, default=())
    parser.add_argument("--neuron-ratios", type=_floats, default=(),
                        help="also measure neuron-selection models at these ratios (format v2: I' = the multiple "
                             "of 8 nearest (1 - ratio) I, r = H, no bases; synthetic), e.g. 0.4,0.6")
    parser.add_argument("--expert-bases-ratios", type=_floats, default=(),
                        help="also measure models whose every expert has its own bases at these ratios (format "
                             "v4, basis_groups = E; synthetic), e.g. 0.4")
    parser.add_argument("--batch-sizes", type=_ints, default=(1, 8, 32))
    parser.add_argument("--block-tokens", type=_ints, default=(1, 32, 512))
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds per pair (default 2)")
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile in the engines")
    parser.add_argument("--served-ratios", type=_floats, default=(0.4,),
                        help="ratios that also get a served A/B (empty string: none)")
    parser.add_argument("--served-prompts", type=int, default=32)
    parser.add_argument("--served-concurrency", type=_ints, default=None,
                        help="load levels of the served A/B (default: --batch-sizes)")
    parser.add_argument("--no-served", action="store_true", help="skip the served A/B")
    parser.add_argument("--compress-samples", type=int, default=16)
    parser.add_argument("--compress-seq-len", type=int, default=128)
    parser.add_argument("--compressor", default="synthetic", choices=("synthetic", "moesvd"),
                        help="synthetic: random factors at the ratio's rank (speed does not depend on values; "
                             "default); moesvd: run `moesvd compress` for every ratio")
    parser.add_argument("--cost-layers", type=int, default=1,
                        help="layers of the model whose real compression is timed (synthetic mode)")
    parser.add_argument("--cost-experts", type=int, default=None,
                        help="expert count of that model (default: the shape's; fewer to bound its RAM)")
    parser.add_argument("--no-cost", action="store_true", help="skip the compression-cost measurement")
    parser.add_argument("--rebuild", action="store_true", help="rebuild compressed models even if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="CI smoke run: tiny qwen3_moe fixture, 1 layer, ratio 0.4 (real compressor) and 0.4 "
                             "by neuron selection (synthetic), few prompts")
    args = parser.parse_args(argv)
    return tiny_options(args) if args.tiny else options_from_args(args)


def options_from_args(args: argparse.Namespace) -> PerfOptions:
    offline = OfflineOptions(batch_sizes=args.batch_sizes, block_tokens=args.block_tokens,
                             input_len=args.input_len, output_len=args.output_len, repeats=args.repeats,
                             enforce_eager=args.enforce_eager, seed=args.seed)
    served = None if args.no_served or not args.served_ratios else ServedOptions(
        ratios=args.served_ratios, concurrency=args.served_concurrency or args.batch_sizes,
        num_prompts=args.served_prompts,
        max_tokens=args.output_len)
    return PerfOptions(out=args.out, model=ModelSpec(args.shape, args.layers, args.seed), ratios=args.ratios,
                       basis_dtype=args.basis_dtype, extra_basis_dtype=args.extra_basis_dtype,
                       extra_basis_ratios=args.extra_basis_ratios, neuron_ratios=args.neuron_ratios,
                       expert_bases_ratios=args.expert_bases_ratios,
                       compress_samples=args.compress_samples,
                       compress_seq_len=args.compress_seq_len, offline=offline, served=served,
                       reuse_models=not args.rebuild, compressor=args.compressor,
                       cost_ratio=None if args.no_cost else 0.4, cost_layers=args.cost_layers,
                       cost_experts=args.cost_experts)


def tiny_options(args: argparse.Namespace) -> PerfOptions:
    offline = OfflineOptions(batch_sizes=(1, 4), block_tokens=(1, 32), input_len=16, output_len=8, repeats=2,
                             block_repeats=2, profile_tokens=(32,), max_model_len=256, enforce_eager=True,
                             seed=args.seed)
    served = None if args.no_served else ServedOptions(ratios=(0.4,), concurrency=(1, 4), num_prompts=4,
                                                       max_tokens=8, words_per_prompt=8)
    return PerfOptions(out=args.out, model=ModelSpec("tiny", 1, args.seed), ratios=(0.4,), neuron_ratios=(0.4,),
                       expert_bases_ratios=(0.4,),
                       basis_dtype=args.basis_dtype, compress_samples=4, compress_seq_len=32, ratio_tolerance=0.1,
                       offline=offline, served=served, reuse_models=not args.rebuild, compressor="moesvd")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
