"""Models for the performance benchmark: the dense benchmark checkpoint and its compressed versions.

The dense model is a random checkpoint with real layer shapes (`offline.fixtures.bench_shapes`), or a
tiny fixture for CI. Compressed versions come from the real compressor (`moesvd compress`), run in a
child process so that its wall time and peak resident memory (`os.wait4`'s ru_maxrss) are measured on
their own. Random weights are fine for speed: the kernels' cost does not depend on the values.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moesvd_vllm.architectures import MoEDims, moe_dims, moe_layer_indices

from moesvd_vllm.format.schema import (

    INTERMEDIATE_MULTIPLE,

    RANK_MULTIPLE,

    LayerSpec,

    dense_layer_params,

    read_moe_svd_config,

)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIBRATION = REPO_ROOT / "offline" / "bundled" / "kjv_text" / "train.txt"
_BUILD_MARKER = "moesvd_perf_build.json"


@dataclass(frozen=True)
class ModelSpec:
    """Which dense model to build."""

    shape: str  # "qwen3-30b-a3b", "mixtral-8x7b", or "tiny" (the qwen3_moe test fixture)
    layers: int
    seed: int = 0
    dtype: str = "bfloat16"
    num_experts: int | None = None  # override (smaller compression-cost models); None: the shape's


@dataclass(frozen=True)
class CompressSpec:
    """How to compress (options of `moesvd compress`; few calibration tokens: weights are random)."""

    ratio: float
    basis_dtype: str = "bfloat16"
    method: str = "moe-svd-stacked"
    num_samples: int = 16
    seq_len: int = 128
    ratio_tolerance: float = 0.01  # tiny models: ranks in steps of 32 cannot hit every ratio
    calib: str = str(DEFAULT_CALIBRATION)


@dataclass(frozen=True)
class SyntheticShape:
    """Shape of every layer of a synthetic compressed model: rank r, kept intermediate neurons I'
    (None: all I), shared bases or none (neuron selection alone: r = H, no bases)."""

    rank: int
    intermediate: int | None = None
    bases: bool = True
    basis_groups: int = 1  # E: every expert its own bases (format version 4)


@dataclass
class CompressionCost:
    """Wall time and peak memory of one `moesvd compress` run (a child process)."""

    ratio: float
    seconds: float
    peak_rss_bytes: int
    layers: int
    seconds_per_layer: float
    dense_layer_bytes: int  # routed-expert bytes of one dense layer
    peak_over_layer_bytes: float  # peak RSS / one layer's expert bytes
    stages: dict  # the compressor's own per-stage report, when it wrote one


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_dense_model(spec: ModelSpec, out_dir: Path) -> Path:
    """Build (or reuse, when built with the same spec) the dense benchmark checkpoint."""
    marker = out_dir / _BUILD_MARKER
    if _read_json(marker) == asdict(spec):
        logger.info("reusing dense model %s", out_dir)
        return out_dir
    started = time.monotonic()
    if spec.shape == "tiny":
        from offline.fixtures.tiny import build_tiny_checkpoint

        build_tiny_checkpoint("qwen3_moe", out_dir, seed=spec.seed, dtype=spec.dtype,
                              num_layers=spec.layers)
    else:
        from offline.fixtures.bench_shapes import build_bench_model

        overrides = {"num_experts": spec.num_experts} if spec.num_experts else None
        build_bench_model(spec.shape, out_dir, layers=spec.layers, seed=spec.seed, dtype=spec.dtype,
                          overrides=overrides)
    marker.write_text(json.dumps(asdict(spec), indent=1))
    logger.info("built dense %s model (%d layers) in %.0f s", spec.shape, spec.layers,
                time.monotonic() - started)
    return out_dir


def model_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def dense_dims(model_dir: Path) -> MoEDims:
    return moe_dims(model_config(model_dir))


def expected_rank(dims: MoEDims, ratio: float) -> int:
    """The uniform rank that removes `ratio` of the expert parameters (shared bases counted), rounded
    to the kernel's multiple: r (2H + 3 E I) = (1 - ratio) E 3 I H."""
    kept = (1.0 - ratio) * dense_layer_params(dims)
    per_rank = 2 * dims.hidden + 3 * dims.num_experts * dims.intermediate
    return max(RANK_MULTIPLE, int(round(kept / per_rank / RANK_MULTIPLE)) * RANK_MULTIPLE)


def expected_intermediate(dims: MoEDims, ratio: float) -> int:
    """Kept intermediate neurons per expert that remove `ratio` of the expert parameters at full rank
    without bases (E 3 I' H = (1 - ratio) E 3 I H): the multiple of 8 nearest to (1 - ratio) I."""
    kept = (1.0 - ratio) * dims.intermediate / INTERMEDIATE_MULTIPLE
    return min(dims.intermediate, max(INTERMEDIATE_MULTIPLE, int(round(kept)) * INTERMEDIATE_MULTIPLE))


def expected_expert_bases_rank(dims: MoEDims, ratio: float) -> int:
    """The uniform rank with every expert's own bases (basis_groups = E) that removes `ratio`, rounded to
    the kernel's multiple: r (2 E H + 3 E I) = (1 - ratio) E 3 I H."""
    kept = (1.0 - ratio) * dense_layer_params(dims)
    per_rank = dims.num_experts * (2 * dims.hidden + 3 * dims.intermediate)
    return max(RANK_MULTIPLE, int(round(kept / per_rank / RANK_MULTIPLE)) * RANK_MULTIPLE)


def synthetic_shape(dims: MoEDims, ratio: float, *, neurons: bool, expert_bases: bool = False) -> SyntheticShape:
    """Rank reduction (uniform rank, all neurons, bases; with `expert_bases` one pair per expert) or
    neuron selection (I', r = H, no bases)."""
    if neurons:
        return SyntheticShape(rank=dims.hidden, intermediate=expected_intermediate(dims, ratio), bases=False)
    if expert_bases:
        return SyntheticShape(rank=expected_expert_bases_rank(dims, ratio), basis_groups=dims.num_experts)
    return SyntheticShape(rank=expected_rank(dims, ratio))


def _compress_command(dense_dir: Path, out_dir: Path, spec: CompressSpec) -> list[str]:
    return [sys.executable, "-m", "moesvd_vllm.cli", "compress", str(dense_dir), "--out", str(out_dir),
            "--ratio", str(spec.ratio), "--calib", spec.calib, "--method", spec.method,
            "--selection", "all", "--basis-dtype", spec.basis_dtype,
            "--num-samples", str(spec.num_samples), "--seq-len", str(spec.seq_len),
            "--batch-size", str(min(spec.num_samples, 4)), "--ratio-tolerance", str(spec.ratio_tolerance),
            "--force"]


def _resident_bytes(pid: int) -> int:
    """Current resident set size of process `pid` (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_measured(command: list[str], log_path: Path, poll_s: float = 0.2) -> tuple[float, int]:
    """Run `command`; (wall seconds, peak RSS bytes of the child).

    The peak is sampled from /proc/PID/status every `poll_s` (callers also take the compressor's own
    per-stage peaks): the compressor resets its high-water mark per stage (`/proc/self/clear_refs`),
    which also resets the kernel's ru_maxrss, so wait4 would report only the last stage's peak.
    """
    started = time.monotonic()
    peak = 0
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        while process.poll() is None:
            peak = max(peak, _resident_bytes(process.pid))
            time.sleep(poll_s)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{' '.join(command[:5])} ... failed ({process.returncode}):\n" + "\n".join(tail))
    return seconds, peak


def _stage_peak(report: dict) -> int:
    """The largest per-stage peak RSS in the compressor's report.json (0 when absent)."""
    return max((int(stage.get("peak_rss_bytes", 0)) for stage in report.get("stages", [])), default=0)


def compress_model(dense_dir: Path, out_dir: Path, spec: CompressSpec, *, reuse: bool = True
                   ) -> tuple[Path, CompressionCost | None]:
    """Compress with `moesvd compress` in a child process; reuse an existing output with the same spec
    (then no cost is returned: it was measured when it was built)."""
    marker = out_dir / _BUILD_MARKER
    if reuse and _read_json(marker) == asdict(spec) and (out_dir / "config.json").exists():
        logger.info("reusing compressed model %s", out_dir)
        return out_dir, None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = out_dir.parent / f"{out_dir.name}.compress.log"
    logger.info("compressing %s at ratio %.2f -> %s (log: %s)", dense_dir.name, spec.ratio, out_dir,
                log_path)
    seconds, peak = _run_measured(_compress_command(dense_dir, out_dir, spec), log_path)
    marker.write_text(json.dumps(asdict(spec), indent=1))
    report = _read_json(out_dir / "report.json") or {}
    peak = max(peak, _stage_peak(report))
    config = model_config(dense_dir)
    layers = len(moe_layer_indices(config))
    layer_bytes = dense_layer_params(moe_dims(config)) * 2  # bf16/fp16 checkpoints
    cost = CompressionCost(ratio=spec.ratio, seconds=seconds, peak_rss_bytes=peak, layers=layers,
                           seconds_per_layer=seconds / max(layers, 1), dense_layer_bytes=layer_bytes,
                           peak_over_layer_bytes=peak / layer_bytes,
                           stages=report)
    logger.info("compressed in %.0f s (%.1f s/layer), peak RSS %.2f GB (%.2fx one layer's experts)",
                seconds, cost.seconds_per_layer, peak / 1e9, cost.peak_over_layer_bytes)
    return out_dir, cost


def synthetic_compressed_model(dense_dir: Path, out_dir: Path, ratio: float, basis_dtype: str, seed: int, *,
                               neurons: bool = False, expert_bases: bool = False) -> Path:
    """Random factors removing `ratio` of the expert parameters (speed only;
    benchmarks/synthetic_compressed.py): by a uniform rank, or by neuron selection (`neurons`)."""
    from benchmarks.synthetic_compressed import write_synthetic_compressed

    shape = synthetic_shape(dense_dims(dense_dir), ratio, neurons=neurons, expert_bases=expert_bases)
    spec = {"synthetic": True, **asdict(shape), "basis_dtype": basis_dtype, "seed": seed}
    marker = out_dir / _BUILD_MARKER
    if _read_json(marker) == spec and (out_dir / "config.json").exists():
        logger.info("reusing synthetic compressed model %s", out_dir)
        return out_dir
    write_synthetic_compressed(dense_dir, out_dir, shape.rank, intermediate=shape.intermediate, bases=shape.bases,
                               basis_dtype=basis_dtype, seed=seed, basis_groups=shape.basis_groups)
    marker.write_text(json.dumps(spec, indent=1))
    return out_dir


def layer_specs(model_dir: Path) -> dict[str, LayerSpec]:
    """The checkpoint's decomposed layers (layer index -> LayerSpec); empty for a dense checkpoint."""
    block = read_moe_svd_config(model_dir)
    return {} if block is None else dict(block.layers)


def promised_params(model_dir: Path) -> dict:
    """The checkpoint metadata's expert parameter counts (ParamCounts) and per-layer ranks."""
    block = read_moe_svd_config(model_dir)
    if block is None:
        dims = dense_dims(model_dir)
        layers = len(moe_layer_indices(model_config(model_dir)))
        count = layers * dense_layer_params(dims)
        return {"expert_dense": count, "expert_compressed": count, "ratio": 0.0, "ranks": {},
                "basis_dtype": None}
    return {"expert_dense": block.params.expert_dense, "expert_compressed": block.params.expert_compressed,
            "ratio": block.params.ratio,
            "ranks": {key: spec.rank for key, spec in block.layers.items()},
            "basis_dtype": sorted({spec.basis_dtype for spec in block.layers.values()})}
