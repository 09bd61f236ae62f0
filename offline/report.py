"""Compression report: per-stage time and peak memory, per-layer choices and errors; report.md/json + plot."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from moesvd_vllm.format.schema import decomposed_layer_params

if TYPE_CHECKING:
    from moesvd_vllm.architectures import MoEDims
    from moesvd_vllm.format.schema import CalibrationInfo, MoESVDConfig
    from offline.compression_options import CompressionOptions
    from offline.layerwise import LayerwiseModel
    from offline.methods import CompressedLayer
    from offline.pipeline import LayerSensitivity
    from offline.sensitivity import Plan

logger = logging.getLogger(__name__)


def _peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), or the process lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_bytes: int
    peak_is_per_stage: bool  # False: the process-lifetime peak (VmHWM could not be reset)


@dataclass
class StageClock:
    stages: list[StageRecord] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        per_stage = _reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            record = StageRecord(name, time.perf_counter() - start, _peak_rss_bytes(), per_stage)
            self.stages.append(record)
            logger.info("stage %s: %.1f s, peak RSS %.0f MiB", name, record.seconds,
                        record.peak_rss_bytes / 2**20)


@dataclass
class LayerReport:
    layer: int
    sensitivity: float | None
    decomposed: bool
    rank: int | None = None
    intermediate: int | None = None  # intermediate neurons kept per expert
    bases: bool | None = None  # shared bases stored (False: neuron selection only, r = H)
    num_banks: int | None = None
    bank_map: list[int] | None = None
    routing_frequency: list[float] | None = None
    principal_rank: list[float] | None = None
    outlier_ratio: list[float] | None = None
    relative_error: dict[str, float] | None = None  # projection -> ||(W-W')X|| ^2 / ||W X||^2
    # ("slimming": the down error of the neuron selection alone, with compensation)
    params_dense: int = 0
    params_compressed: int = 0


def layer_report(index: int, score: float | None, measured: LayerSensitivity | None,
                 result: CompressedLayer | None, dense: int, dims: MoEDims) -> LayerReport:
    """One MoE layer's row: its sensitivity measurements and, when it was compressed, what was chosen."""
    spec = result.spec if result else None
    return LayerReport(
        layer=index, sensitivity=score, decomposed=result is not None,
        rank=spec.rank if spec else None,
        intermediate=spec.kept_intermediate(dims) if spec else None,
        bases=spec.bases if spec else None,
        num_banks=spec.num_banks if spec else None,
        bank_map=spec.bank_map if spec else None,
        routing_frequency=measured.frequency.tolist() if measured else None,
        principal_rank=measured.principal_rank.tolist() if measured else None,
        outlier_ratio=measured.outlier_ratio.tolist() if measured else None,
        relative_error=result.relative_error if result else None,
        params_dense=dense,
        params_compressed=decomposed_layer_params(spec, dims) if spec else dense)


def compression_summary(model: LayerwiseModel, options: CompressionOptions, plan: Plan, block: MoESVDConfig,
                        calibration: CalibrationInfo) -> dict[str, Any]:
    """The report's summary: model, method, requested and achieved ratio, plan, calibration, options."""
    return {
        "model_dir": str(model.model_dir), "model_type": model.model_type, "method": options.method,
        "target_ratio": options.ratio, "achieved_ratio": round(block.params.ratio, 6),
        "expert_params_dense": block.params.expert_dense,
        "expert_params_compressed": block.params.expert_compressed,
        "decomposed_layers": block.decomposed_layers, "ranks": {str(k): v for k, v in plan.ranks.items()},
        "intermediate": {str(k): s.intermediate for k, s in plan.shapes.items()},
        "calibration": asdict(calibration), "options": options.recorded(),
    }


def write_reports(out_dir: Path, summary: dict[str, Any], layers: list[LayerReport],
                  stages: list[StageRecord]) -> None:
    data = {"summary": summary, "layers": [asdict(x) for x in layers], "stages": [asdict(s) for s in stages]}
    (out_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(summary, layers, stages), encoding="utf-8")
    _plot_sensitivity(out_dir / "sensitivity.png", layers, summary.get("method", ""))


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(summary: dict[str, Any], layers: list[LayerReport], stages: list[StageRecord]) -> str:
    lines = [f"# MoE-SVD compression report: {summary.get('method')}", ""]
    for key in ("model_dir", "method", "target_ratio", "achieved_ratio", "expert_params_dense",
                "expert_params_compressed", "decomposed_layers", "calibration"):
        lines.append(f"- **{key}**: {summary.get(key)}")
    lines += ["", "## Layers", "",
              "| layer | S_L | decomposed | rank | neurons | bases | banks | err gate | err up | err down "
              "| err slimming | params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in layers:
        err = x.relative_error or {}
        lines.append(f"| {x.layer} | {_fmt(x.sensitivity)} | {'yes' if x.decomposed else 'no'} | "
                     f"{x.rank or '-'} | {x.intermediate or '-'} | {_fmt(x.bases, '')} | "
                     f"{x.num_banks or '-'} | {_fmt(err.get('gate'))} | "
                     f"{_fmt(err.get('up'))} | {_fmt(err.get('down'))} | {_fmt(err.get('slimming'))} | "
                     f"{x.params_compressed}/{x.params_dense} |")
    lines += ["", "Errors are relative activation-weighted errors ||(W - W')X^T||^2 / ||W X^T||^2 on the "
              "calibration inputs of each expert, summed over experts.", "", "## Stages", "",
              "| stage | seconds | peak RSS (MiB) |", "|---|---|---|"]
    for s in stages:
        note = "" if s.peak_is_per_stage else " (process peak)"
        lines.append(f"| {s.name} | {s.seconds:.1f} | {s.peak_rss_bytes / 2**20:.0f}{note} |")
    return "\n".join(lines) + "\n"


def _plot_sensitivity(path: Path, layers: list[LayerReport], method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = [x.layer for x in layers]
    ys = [x.sensitivity if x.sensitivity is not None else 0.0 for x in layers]
    colors = ["tab:red" if x.decomposed else "tab:blue" for x in layers]
    ax.bar(xs, ys, color=colors)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("sensitivity S_L (Eq. 4)")
    ax.set_title(f"{method}: red = decomposed, blue = kept dense")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
