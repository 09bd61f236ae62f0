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

from serve.http import get_text, metric_value, parse_metrics, post_json
from serve.launch import ServerOptions, VLLMServer

logger = logging.getLogger(__name__)

DEMO_PROMPT = "And God said,"


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    ratio: float = 0.4
    dtype: str = "float32"
    max_tokens: int = 32
    enforce_eager: bool = True


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
    print(f"[1/2] serving the bundled model {dense_dir} with vLLM")
    with _server(dense_dir, "dense", options) as dense:
        summary["dense"] = _completion_and_tokens_per_second(dense, options)
    print(f"[2/2] done: {summary['dense']['tokens_per_second']:.1f} output tokens/s (vLLM /metrics)")
    return summary


def _server(model_dir: Path, name: str, options: DemoOptions) -> VLLMServer:
    return VLLMServer(ServerOptions(
        model=str(model_dir), served_model_name=name, dtype=options.dtype,
        enforce_eager=options.enforce_eager, log_path=str(options.out / f"vllm-{name}.log")))


def _completion_and_tokens_per_second(server: VLLMServer, options: DemoOptions) -> dict:
    """One greedy completion, printed, and output tokens/s measured from the server's own counter."""
    before = metric_value(parse_metrics(get_text(server.url("/metrics"))),
                          "vllm:generation_tokens_total", model_name=server.name)
    started = time.monotonic()
    response = post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": DEMO_PROMPT, "max_tokens": options.max_tokens,
        "temperature": 0.0})
    elapsed = time.monotonic() - started
    after = metric_value(parse_metrics(get_text(server.url("/metrics"))),
                         "vllm:generation_tokens_total", model_name=server.name)
    text = response["choices"][0]["text"]
    print(f"  {server.name}: {DEMO_PROMPT}{text!s}")
    generated = after - before
    return {"startup_seconds": server.startup_seconds, "completion": text,
            "generated_tokens": generated, "tokens_per_second": generated / elapsed}
