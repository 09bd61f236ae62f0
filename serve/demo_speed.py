"""The demo's speed leg: a model whose MoE blocks dominate the step time, dense against compressed.

The bundled model (hidden 128, 8 experts) spends most of a decoding step outside its experts, so its
speed ratio says little. This leg builds a model with the real layer shapes of Qwen3-30B-A3B (hidden 2048,
128 experts, top-8, expert intermediate 768; `offline.fixtures.bench_shapes`), with few decoder layers
and the fixture's 512-token vocabulary to fit the demo's time, RANDOM weights, and a compressed twin
with SYNTHETIC factors (`benchmarks.synthetic_compressed`: random, of the shapes the default method
produces at the ratio: I' = I/2 neurons per expert, then the shared-basis rank that removes the rest).
Serving cost depends on the shapes, not the values: the text both produce is meaningless, the tokens/s
are what the kernels deliver. Both are served by vLLM and compared with `moesvd ab` (rounds, spread,
verdict; speed only).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moesvd_vllm.format.schema import FORMAT_VERSION, INTERMEDIATE_MULTIPLE, RANK_MULTIPLE

logger = logging.getLogger(__name__)

SHAPE = "qwen3-30b-a3b"
REPO_ROOT = Path(__file__).resolve().parent.parent


_MARKER = "moesvd-demo-speed-leg.json"


@dataclass(frozen=True)
class SpeedLegOptions:
    layers: int = 1
    ratio: float = 0.6
    dtype: str = "bfloat16"
    concurrency: int = 16
    num_prompts: int = 16
    max_tokens: int = 32
    repeats: int = 6
    min_round_seconds: float = 4.0
    seed: int = 0


def default_cache_dir() -> Path:
    """Where the speed leg's models are kept between demo runs ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moesvd-vllm" / "demo-speed-leg"


def default_form(hidden: int, intermediate: int, num_experts: int, ratio: float) -> tuple[int, int]:
    """(I', r) of the default method at `ratio`: half the neurons (min_intermediate_fraction 0.5), then the
    rank that removes the rest with shared bases: r (2H + 3 E I') = (1 - ratio) 3 E I H (rounded to 32)."""
    kept_intermediate = max(INTERMEDIATE_MULTIPLE, (intermediate // 2) // 32 * 32)
    kept = (1.0 - ratio) * 3 * num_experts * intermediate * hidden
    rank = int(round(kept / (2 * hidden + 3 * num_experts * kept_intermediate) / RANK_MULTIPLE)) * RANK_MULTIPLE
    return kept_intermediate, max(RANK_MULTIPLE, min(hidden, rank))


def _spec(options: SpeedLegOptions) -> dict:
    """What the built models depend on (a cached pair is reused only when this matches)."""
    return {"shape": SHAPE, "layers": options.layers, "ratio": options.ratio, "dtype": options.dtype,
            "seed": options.seed, "format_version": FORMAT_VERSION}


def build_models(cache: Path, options: SpeedLegOptions) -> tuple[Path, Path, dict]:
    """(dense dir, compressed dir, what was built): the random dense model and its synthetic twin,
    reused from `cache` when an earlier run built the same pair."""
    spec = _spec(options)
    home = cache / f"{SHAPE}-x{options.layers}-{options.dtype}-{round(100 * options.ratio)}"
    marker = home / _MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("spec") == spec:
            logger.info("reusing the speed leg's models in %s", home)
            return home / "dense", home / "compressed", {**recorded["info"], "reused_from": str(home)}
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    dense_dir, compressed_dir, info = _build(home, options)
    marker.write_text(json.dumps({"spec": spec, "info": info}, indent=1))  # written last: a complete pair
    return dense_dir, compressed_dir, info


def _build(home: Path, options: SpeedLegOptions) -> tuple[Path, Path, dict]:
    if str(REPO_ROOT) not in sys.path:  # benchmarks/ is a repository directory, not an installed package
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.synthetic_compressed import write_synthetic_compressed
    from offline.fixtures.bench_shapes import BENCH_SHAPES, build_bench_model

    started = time.monotonic()
    dense_dir = build_bench_model(SHAPE, home / "dense", layers=options.layers, dtype=options.dtype,
                                  seed=options.seed)
    built_dense = time.monotonic() - started
    dims = BENCH_SHAPES[SHAPE].dims
    intermediate, rank = default_form(dims.hidden_size, dims.moe_intermediate_size, dims.num_experts,
                                      options.ratio)
    compressed_dir = write_synthetic_compressed(dense_dir, home / "compressed", rank, intermediate=intermediate,
                                                bases=True, seed=options.seed)
    params = json.loads((compressed_dir / "config.json").read_text())["moe_svd"]["params"]
    info = {"shape": SHAPE, "reference": BENCH_SHAPES[SHAPE].reference, "layers": options.layers,
            "dtype": options.dtype, "weights": "random (speed only)", "factors": "synthetic random",
            "rank": rank, "kept_intermediate": intermediate, "intermediate": dims.moe_intermediate_size,
            "hidden": dims.hidden_size, "experts": dims.num_experts,
            "achieved_ratio": 1.0 - params["expert_compressed"] / params["expert_dense"],
            "seconds_dense": built_dense, "seconds_total": time.monotonic() - started,
            "options": asdict(options)}
    return dense_dir, compressed_dir, info


def describe(info: dict) -> str:
    return (f"{info['layers']} decoder layer(s) with {info['reference']} shapes (hidden {info['hidden']}, "
            f"{info['experts']} experts, expert intermediate {info['intermediate']}), vocabulary 512, "
            f"{info['dtype']}, RANDOM weights; compressed twin with SYNTHETIC random factors of the default's "
            f"form at {info['achieved_ratio']:.1%}: I' = {info['kept_intermediate']} neurons per expert and "
            f"shared bases of rank {info['rank']}")
