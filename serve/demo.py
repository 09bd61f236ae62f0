"""`moesvd demo`: the main job on the bundled model, end to end.

compress the bundled model -> serve dense and compressed with vLLM -> a completion from each ->
A/B report (speed and quality) -> tokens/s read from the servers' /metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.ab import ABOptions, run_ab
from serve.endpoints import Endpoint
from serve.loadgen import GenerationSettings, run_load
from serve.prompts import load_prompts
from serve.http import post_json
from serve.launch import ServerOptions, VLLMServer
from serve.vllm_metrics import rates_between, scrape

logger = logging.getLogger(__name__)

DEMO_PROMPT = "And God said,"


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    ratio: float = 0.4
    dtype: str = "float32"
    max_tokens: int = 32
    enforce_eager: bool = True
    num_prompts: int = 16  # A/B prompts from the bundled corpus's test split
    concurrency: tuple[int, ...] = (1, 8)
    calib_samples: int = 64  # calibration windows x tokens for the compressor
    calib_seq_len: int = 128
    ratio_tolerance: float = 0.01  # achieved ratio within 1 point of `ratio` (the compressor's default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for everything the demo produces (default: a temporary one)")
    parser.add_argument("--ratio", type=float, default=0.4,
                        help="fraction of expert parameters to remove (default: 0.4)")
    parser.add_argument("--dtype", default="float32", help="serving dtype (default: float32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per demo completion")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the model (slower start-up; default: eager)")


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="moesvd-demo-"))
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    options = DemoOptions(out=out, ratio=args.ratio, dtype=args.dtype, max_tokens=args.max_tokens,
                          enforce_eager=not args.compile)
    summary = run_demo(options)
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nEverything the demo produced is under {out}")
    return 0


def run_demo(options: DemoOptions) -> dict:
    from offline.bundled import bundled_model_dir

    dense_dir = bundled_model_dir()
    summary: dict = {"options": asdict(options), "dense_model": str(dense_dir)}
    print(f"[1/5] compressing the bundled model {dense_dir} (ratio {options.ratio})")
    compressed_dir, summary["compression"] = _compress(dense_dir, options)
    print(f"      -> {compressed_dir}: {summary['compression']['achieved_ratio']:.1%} of expert "
          f"parameters removed in {summary['compression']['seconds']:.0f} s")
    print("[2/5] starting vLLM for the dense and the compressed model")
    dense = _server(dense_dir, "dense", options).spawn()
    compressed = _server(compressed_dir, "compressed", options).spawn()
    try:
        for server in (dense, compressed):
            server.wait_until_ready()
            print(f"      {server.name}: {server.base_url} ready in {server.startup_seconds:.0f} s")
        print("[3/5] one greedy completion from each")
        summary["completions"] = {s.name: _completion(s, options) for s in (dense, compressed)}
        print("[4/5] A/B: the same prompts to both (speed and quality)")
        report = run_ab(ABOptions(
            a_url=dense.base_url, b_url=compressed.base_url, a_model="dense", b_model="compressed",
            num_prompts=options.num_prompts, concurrency=options.concurrency,
            max_tokens=options.max_tokens, out=options.out / "ab", show_progress=False))
        print(report.to_console())
        summary["ab_report"] = str(options.out / "ab")
        print(f"[5/5] tokens/s under load (concurrency {max(options.concurrency)}), read from each "
              "server's /metrics")
        summary["tokens_per_second"] = {}
        for server in (dense, compressed):
            tokens_per_s = _tokens_per_second_under_load(server, options)
            summary["tokens_per_second"][server.name] = tokens_per_s
            print(f"      {server.name:>10}: {tokens_per_s:.1f} generated tokens/s "
                  "(increase of vllm:generation_tokens_total over the load)")
        ratio = summary["tokens_per_second"]["compressed"] / summary["tokens_per_second"]["dense"]
        print(f"      compressed / dense: {ratio:.2f}x")
    finally:
        dense.stop()
        compressed.stop()
    return summary


def _compress(dense_dir: Path, options: DemoOptions) -> tuple[Path, dict]:
    from offline.bundled import corpus_split_path
    from offline.compress import CompressionOptions, compress

    out_dir = options.out / f"compressed-{round(options.ratio * 100)}"
    started = time.monotonic()
    compress(dense_dir, out_dir, CompressionOptions(
        ratio=options.ratio, calib=str(corpus_split_path("train")),
        num_samples=options.calib_samples, seq_len=options.calib_seq_len,
        ratio_tolerance=options.ratio_tolerance, force=True))
    report = json.loads((out_dir / "report.json").read_text())
    return out_dir, {"dir": str(out_dir), "seconds": time.monotonic() - started,
                     "achieved_ratio": report["summary"]["achieved_ratio"]}


def _tokens_per_second_under_load(server: VLLMServer, options: DemoOptions) -> float:
    """Load one server alone with the A/B prompts and read its generation rate from its own counter."""
    endpoint = Endpoint(label=server.name, base_url=server.base_url, model=server.name)
    prompts, _ = load_prompts(None, num_prompts=options.num_prompts)
    before = scrape(server.url("/metrics"))
    run_load(endpoint, prompts, GenerationSettings(max_tokens=options.max_tokens),
             max_concurrency=max(options.concurrency), show_progress=False)
    rates = rates_between(before, scrape(server.url("/metrics")))
    return rates[server.name].generation_tokens_per_s


def _server(model_dir: Path, name: str, options: DemoOptions) -> VLLMServer:
    return VLLMServer(ServerOptions(
        model=str(model_dir), served_model_name=name, dtype=options.dtype,
        enforce_eager=options.enforce_eager, log_path=str(options.out / f"vllm-{name}.log")))


def _completion(server: VLLMServer, options: DemoOptions) -> str:
    response = post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": DEMO_PROMPT, "max_tokens": options.max_tokens,
        "temperature": 0.0})
    text = response["choices"][0]["text"]
    print(f"      {server.name:>10}: {DEMO_PROMPT}{text}")
    return text
