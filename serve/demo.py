"""`moesvd demo`: the main job on the bundled model, end to end, and a speed leg where the MoE dominates.

1. compress the bundled model (default method; at 60 % its plan has shared bases in every layer) and
   say what each layer became (neurons only / shared basis of rank r / banks);
2. serve dense and compressed with vLLM (while they start, build the speed leg's models);
3. a greedy completion from each;
4. `moesvd ab` between them: speed (alternating rounds, median [min-max], verdict), quality (perplexity,
   KL, top-1) and task recovery (lm-eval on the local tasks built from the held-out corpus);
5. the speed leg (serve/demo_speed.py): Qwen3-30B-A3B-shaped layers with random weights, dense against
   synthetic compressed factors of the default's form, served by vLLM, `moesvd ab` speed only; the
   generated tokens are reconciled with each server's own /metrics counter.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments, option
from serve.ab import ABOptions, run_ab
from serve.ab_stats import describe as describe_ratio
from serve.demo_speed import SpeedLegOptions, build_models, default_cache_dir, describe as describe_speed_models
from serve.http import HTTPError, get_text, metric_value, parse_metrics, post_json
from serve.launch import ServerOptions, VLLMServer
from serve.lm_tasks import LOCAL_TASKS

logger = logging.getLogger(__name__)

DEMO_PROMPT = "And God said,"
STEPS = 5
# Shorter than `moesvd ab`'s defaults (6 rounds of >= 8 s) to fit the demo in 10 minutes: the bundled model's
# speed says little anyway (step 4's note); the speed leg uses 6 rounds of >= 4 s (serve/demo_speed.py).
BUNDLED_ROUNDS, BUNDLED_ROUND_SECONDS = 3, 4.0
# Four servers run in the demo (two at a time): 256 MiB of KV cache each holds over 100k tokens of either
# model, far more than the demo's 16 concurrent requests need, and leaves memory to a small shared host.
DEMO_KV_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class DemoOptions:
    out: Path | None = option(None, "directory for everything the demo produces (unset: a temporary one)",
                              metavar="DIR")
    ratio: float = option(0.6, "fraction of the bundled model's expert parameters to remove (at 0.6 the "
                          "default plan gives every layer shared bases of rank 96; at 0.4 it removes "
                          "neurons only)")
    dtype: str = option("float32", "serving dtype of the bundled model")
    max_tokens: int = option(32, "tokens per completion and per speed request")
    compile: bool = option(False, "let vLLM torch.compile the models (slower start-up; --no-compile: eager)")
    num_prompts: int = option(16, "A/B prompts from the bundled corpus's test split")
    concurrency: tuple[int, ...] = option((8,), "A/B concurrency levels on the bundled model",
                                          parse=lambda t: tuple(int(x) for x in t.split(",") if x.strip()))
    tasks: tuple[str, ...] = option(LOCAL_TASKS, "lm-eval tasks of the bundled A/B",
                                    parse=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()))
    task_limit: int = option(150, "documents per task")
    speed_leg: bool = option(True, "run the speed leg on Qwen3-30B-A3B-shaped layers (--no-speed-leg: skip)")
    speed_layers: int = option(1, "decoder layers of the speed leg's model")
    speed_cache: Path | None = option(None, "where the speed leg's models are kept for the next run (unset: "
                                      "$XDG_CACHE_HOME/moesvd-vllm/demo-speed-leg or ~/.cache/...)", metavar="DIR")
    calib_samples: int = option(64, "calibration windows of the compressor")
    calib_seq_len: int = option(128, "tokens per calibration window")
    ratio_tolerance: float = option(0.01, "achieved ratio within this of --ratio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, DemoOptions)


def run(args: argparse.Namespace) -> int:
    options = from_arguments(DemoOptions, args)
    out = Path(tempfile.mkdtemp(prefix="moesvd-demo-")) if options.out is None else Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run_demo(options, out)
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nEverything the demo produced is under {out}")
    complete = summary["ab"]["complete"] and summary.get("speed_leg", {}).get("complete", True)
    if not complete:
        print("Some requests failed (see PARTIAL above): the numbers are incomplete.")
    return 0 if complete else 1


def _step(number: int, text: str) -> None:
    print(f"[{number}/{STEPS}] {text}", flush=True)


def run_demo(options: DemoOptions, out: Path) -> dict:
    from offline.bundled import bundled_model_dir

    started = time.monotonic()
    dense_dir = bundled_model_dir()
    summary: dict = {"options": asdict(options), "out": str(out), "dense_model": str(dense_dir), "timings_s": {}}
    _step(1, f"compressing the bundled model {dense_dir} (ratio {options.ratio})")
    compressed_dir, summary["compression"] = _compress(dense_dir, out, options)
    print(f"      -> {compressed_dir}: {summary['compression']['achieved_ratio']:.1%} of expert parameters "
          f"removed in {summary['compression']['seconds']:.0f} s; per layer:")
    summary["layers"] = layer_forms(compressed_dir)
    for layer, form in summary["layers"].items():
        print(f"         layer {layer}: {form}")
    summary["timings_s"]["compress"] = time.monotonic() - started
    _step(2, "starting vLLM for the dense and the compressed model")
    dense = _server(dense_dir, "dense", out, options, dtype=options.dtype).spawn()
    compressed = _server(compressed_dir, "compressed", out, options, dtype=options.dtype).spawn()
    speed_models = None
    try:
        if options.speed_leg:
            cache = options.speed_cache or default_cache_dir()
            print(f"      meanwhile, the speed leg's models (random weights, synthetic factors; kept in {cache})")
            speed_models = build_models(cache, _speed_options(options))
            info = speed_models[2]
            print(f"      {'reused' if info.get('reused_from') else 'built in %.0f s' % info['seconds_total']}: "
                  f"{speed_models[0]}, {speed_models[1]}")
        for server in (dense, compressed):
            server.wait_until_ready()
            print(f"      {server.name}: {server.base_url} ready ({server.startup_seconds:.0f} s after spawn)")
        summary["timings_s"]["servers_ready"] = time.monotonic() - started
        _step(3, "one greedy completion from each")
        summary["completions"] = {s.name: _completion(s, options) for s in (dense, compressed)}
        _step(4, "A/B on the same prompts: speed (alternating rounds), quality, task recovery (lm-eval)")
        report = run_ab(ABOptions(
            a_url=dense.base_url, b_url=compressed.base_url, a_model="dense", b_model="compressed",
            num_prompts=options.num_prompts, concurrency=options.concurrency, max_tokens=options.max_tokens,
            repeats=BUNDLED_ROUNDS, min_round_seconds=BUNDLED_ROUND_SECONDS, tasks=options.tasks,
            limit=options.task_limit, out=out / "ab", show_progress=False))
        print(report.to_console())
        print("      Note: the bundled model is too small for its MoE blocks to dominate its step time "
              "(hidden 128, 8 experts of 256 neurons: attention, sampling, scheduling and HTTP weigh as "
              "much), so its speed ratio above says little about a production model. Step 5 measures "
              "speed where the experts dominate.")
        summary["ab"] = {"dir": str(out / "ab"), "headline": report.headline(), "complete": report.complete,
                         "speed": _speed_summary(report), "tasks": (report.tasks or {}).get("rows")}
        summary["timings_s"]["bundled_ab"] = time.monotonic() - started
    finally:
        dense.stop()
        compressed.stop()
    if speed_models is not None:
        _step(5, "speed leg: a model whose MoE blocks dominate the step time")
        summary["speed_leg"] = _speed_leg(speed_models, out, options)
        summary["timings_s"]["speed_leg"] = time.monotonic() - started
    summary["timings_s"]["total"] = time.monotonic() - started
    print(f"\nDemo finished in {summary['timings_s']['total']:.0f} s.")
    return summary


def _speed_options(options: DemoOptions) -> SpeedLegOptions:
    return SpeedLegOptions(layers=options.speed_layers, ratio=options.ratio, max_tokens=options.max_tokens)


def _speed_leg(models, out: Path, options: DemoOptions) -> dict:
    dense_dir, compressed_dir, info = models
    leg = _speed_options(options)
    print(f"      models: {describe_speed_models(info)}")
    print("      the text they produce is meaningless (random weights); the speed is what vLLM's kernels deliver")
    dense = _server(dense_dir, "dense-qwen3-shaped", out, options, dtype=leg.dtype).spawn()
    compressed = _server(compressed_dir, "compressed-qwen3-shaped", out, options, dtype=leg.dtype).spawn()
    try:
        for server in (dense, compressed):
            server.wait_until_ready()
            print(f"      {server.name}: ready ({server.startup_seconds:.0f} s after spawn)")
        before = {s.name: _generated_tokens(s) for s in (dense, compressed)}
        report = run_ab(ABOptions(
            a_url=dense.base_url, b_url=compressed.base_url, num_prompts=leg.num_prompts,
            concurrency=(leg.concurrency,), max_tokens=leg.max_tokens, repeats=leg.repeats,
            min_round_seconds=leg.min_round_seconds, quality=False, out=out / "speed-leg" / "ab",
            show_progress=False))
        after = {s.name: _generated_tokens(s) for s in (dense, compressed)}
        counted = {name: None if after[name] is None or before[name] is None else after[name] - before[name]
                   for name in after}
    finally:
        dense.stop()
        compressed.stop()
    print(report.to_console())
    level = report.speed[0]
    ratio = level["ratios"].get("output_throughput")
    sent = {"A": report.accounting["A"]["completion_tokens"], "B": report.accounting["B"]["completion_tokens"]}
    tokens_per_s = {"dense": level["A"].get("output_throughput"), "compressed": level["B"].get("output_throughput")}
    print(f"      output tokens/s, concurrency {leg.concurrency}: dense {_fmt(tokens_per_s['dense'])}, "
          f"compressed {_fmt(tokens_per_s['compressed'])}; compressed / dense {describe_ratio(ratio)}")
    print(f"      /metrics: the servers counted {_fmt(counted[dense.name])} and {_fmt(counted[compressed.name])} "
          f"generated tokens; the A/B received {sent['A']} and {sent['B']}")
    if not report.complete:
        print("      PARTIAL: " + "; ".join(report.problems[:3]) + f" (server logs: {out})")
    return {"models": info, "dir": str(out / "speed-leg" / "ab"), "complete": report.complete,
            "output_throughput": tokens_per_s, "ratio": ratio, "rounds": level["rounds"],
            "metrics_counted_tokens": counted, "ab_received_tokens": sent, "problems": report.problems}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _speed_summary(report) -> dict:
    return {e["level"]: e["ratios"].get("output_throughput") for e in report.speed}


def _generated_tokens(server: VLLMServer) -> float | None:
    """The server's own count of generated tokens; None when it no longer answers (it died)."""
    try:
        samples = parse_metrics(get_text(server.url("/metrics"), timeout=10.0))
    except (HTTPError, urllib.error.URLError, OSError) as err:
        logger.warning("%s: /metrics unreadable (%s)", server.name, err)
        return None
    return metric_value(samples, "vllm:generation_tokens_total", model_name=server.name)


def layer_forms(model_dir: Path) -> dict[str, str]:
    """Layer index -> what the compressor made of it, in words."""
    from moesvd_vllm.architectures import moe_dims, moe_layer_indices
    from moesvd_vllm.format.schema import read_moe_svd_config

    config = json.loads((model_dir / "config.json").read_text())
    dims = moe_dims(config)
    block = read_moe_svd_config(model_dir)
    forms = {}
    for layer in moe_layer_indices(config):
        spec = block.layers.get(str(layer)) if block else None
        if spec is None:
            forms[str(layer)] = "dense (not compressed)"
            continue
        neurons = f"{spec.kept_intermediate(dims)} of {dims.intermediate} neurons per expert"
        if not spec.bases:
            text = f"neurons only: {neurons}, full rank, no bases"
        else:
            text = f"shared basis rank {spec.rank} of {dims.hidden}, {neurons}"
        if spec.num_banks < spec.num_experts:
            text += f", {spec.num_banks} banks for {spec.num_experts} experts"
        forms[str(layer)] = text
    return forms


def _compress(dense_dir: Path, out: Path, options: DemoOptions) -> tuple[Path, dict]:
    from offline.bundled import corpus_split_path
    from offline.compress import CompressionOptions, compress

    out_dir = out / f"compressed-{round(options.ratio * 100)}"
    started = time.monotonic()
    compress(dense_dir, out_dir, CompressionOptions(
        ratio=options.ratio, calib=str(corpus_split_path("train")),
        num_samples=options.calib_samples, seq_len=options.calib_seq_len,
        ratio_tolerance=options.ratio_tolerance, force=True))
    report = json.loads((out_dir / "report.json").read_text())
    return out_dir, {"dir": str(out_dir), "seconds": time.monotonic() - started,
                     "achieved_ratio": report["summary"]["achieved_ratio"]}


def _server(model_dir: Path, name: str, out: Path, options: DemoOptions, dtype: str) -> VLLMServer:
    return VLLMServer(ServerOptions(
        model=str(model_dir), served_model_name=name, dtype=dtype, enforce_eager=not options.compile,
        kv_cache_bytes=DEMO_KV_CACHE_BYTES, log_path=str(out / f"vllm-{name}.log")))


def _completion(server: VLLMServer, options: DemoOptions) -> str:
    response = post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": DEMO_PROMPT, "max_tokens": options.max_tokens, "temperature": 0.0})
    text = response["choices"][0]["text"]
    print(f"      {server.name:>10}: {DEMO_PROMPT}{text}")
    return text
