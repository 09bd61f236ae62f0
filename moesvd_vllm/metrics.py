"""Compression metrics on the vLLM server's own /metrics (a `vllm.stat_logger_plugins` entry point).

vLLM builds `MoESVDStatLogger(vllm_config, engine_index)` in the API-server process. It exports, per
`model_name` (the server's --served-model-name, the label vLLM's own `vllm:*` series use):

    moesvd_compression_info{model_name, compressed, method, format_version, original_architecture}  1
    moesvd_expert_parameters{model_name, variant="dense"|"compressed"}   routed-expert parameter counts
    moesvd_expert_compression_ratio{model_name}                         fraction of expert params removed
    moesvd_decomposed_layers{model_name}                                MoE layers served compressed
    moesvd_moe_layers{model_name}                                       MoE layers of the architecture
    moesvd_routed_pairs_total{model_name}    (token, expert) pairs the router chose, summed over MoE layers
    moesvd_skipped_pairs_total{model_name}   of those, pairs dynamic expert skipping left out (never computed)

The two counters exist for a model served with skipping (moesvd_vllm/skipping.py); the skipped share is
`rate(moesvd_skipped_pairs_total[1m]) / rate(moesvd_routed_pairs_total[1m])`. The workers count into
memory-mapped files (moesvd_vllm/skip_stats.py), read at every engine iteration; the engine's warm-up
passes, before `log_engine_initialized()`, are left out.

A dense (or non-MoE) model exports only `moesvd_compression_info{compressed="false", method="none"}`, so a
dashboard can tell "not compressed" from "plugin missing" (no series at all). Collectors are created in
`log_engine_initialized()` (vLLM's Prometheus logger, built after plugins, unregisters only `vllm:*`
collectors), once per process and model name: several engine indexes (data parallel) share them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from moesvd_vllm.architectures import moe_layer_indices

from moesvd_vllm.format.schema import CONFIG_KEY, MoESVDConfig, SchemaError
from moesvd_vllm.skip_stats import ensure_stats_dir, read_totals

# vLLM loads this module in the API server before it spawns the engine: the workers inherit the directory.
ensure_stats_dir()

logger = logging.getLogger("vllm.moesvd_vllm.metrics")

PREFIX = "moesvd_"


@dataclass(frozen=True)
class CompressionSummary:
    """What the metrics say about one served model."""

    compressed: bool
    method: str = "none"
    format_version: str = ""
    original_architecture: str = ""
    expert_parameters_dense: int = 0
    expert_parameters_compressed: int = 0
    compression_ratio: float = 0.0
    decomposed_layers: int = 0
    moe_layers: int = 0
    skipping: bool = False


def summarize(hf_config) -> CompressionSummary:
    """Compression summary of a model from its Hugging Face config (dense: `compressed=False`)."""
    block = getattr(hf_config, CONFIG_KEY, None)
    if block is None:
        return CompressionSummary(compressed=False)
    config = MoESVDConfig.from_dict(block)
    import os

    from moesvd_vllm.skipping import BETA_ENV

    override = os.environ.get(BETA_ENV, "").strip().lower()
    skipping = override not in ("off", "none") and (config.skipping is not None or bool(override))
    try:
        moe_layers = len(moe_layer_indices(hf_config.to_dict()))
    except (SchemaError, KeyError):
        moe_layers = 0
    return CompressionSummary(
        compressed=True,
        method=config.method,
        format_version=str(config.format_version),
        original_architecture=",".join(config.original_architectures),
        expert_parameters_dense=config.params.expert_dense,
        expert_parameters_compressed=config.params.expert_compressed,
        compression_ratio=config.params.ratio,
        decomposed_layers=len(config.layers),
        moe_layers=moe_layers,
        skipping=skipping,
    )


class _Collectors:
    """The process-wide gauges (created once; prometheus_client refuses duplicate names)."""

    _instance: "_Collectors | None" = None

    def __init__(self):
        self.info = Gauge(
            f"{PREFIX}compression_info", "MoE-SVD compression of the served model (value 1).",
            ["model_name", "compressed", "method", "format_version", "original_architecture"],
            multiprocess_mode="mostrecent")
        self.expert_parameters = Gauge(
            f"{PREFIX}expert_parameters",
            "Routed-expert parameters (gate/up/down of all MoE layers; shared bases included), dense "
            "original vs compressed.", ["model_name", "variant"], multiprocess_mode="mostrecent")
        self.ratio = Gauge(
            f"{PREFIX}expert_compression_ratio",
            "Fraction of routed-expert parameters removed by compression (0..1).", ["model_name"],
            multiprocess_mode="mostrecent")
        self.decomposed_layers = Gauge(
            f"{PREFIX}decomposed_layers", "MoE layers served compressed (fewer neurons and/or low rank).",
            ["model_name"], multiprocess_mode="mostrecent")
        self.moe_layers = Gauge(
            f"{PREFIX}moe_layers", "MoE layers of the architecture.", ["model_name"],
            multiprocess_mode="mostrecent")

        self.routed_pairs = Counter(
            f"{PREFIX}routed_pairs", "(token, expert) pairs chosen by the routers of the MoE layers.",
            ["model_name"])
        self.skipped_pairs = Counter(
            f"{PREFIX}skipped_pairs", "(token, expert) pairs left out by dynamic expert skipping (not computed).",
            ["model_name"])

    @classmethod
    def get(cls) -> "_Collectors":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def export(self, model_name: str, summary: CompressionSummary) -> None:
        self.info.labels(model_name=model_name, compressed=str(summary.compressed).lower(),
                         method=summary.method, format_version=summary.format_version,
                         original_architecture=summary.original_architecture).set(1)
        if not summary.compressed:
            return
        self.expert_parameters.labels(model_name=model_name, variant="dense").set(
            summary.expert_parameters_dense)
        self.expert_parameters.labels(model_name=model_name, variant="compressed").set(
            summary.expert_parameters_compressed)
        self.ratio.labels(model_name=model_name).set(summary.compression_ratio)
        self.decomposed_layers.labels(model_name=model_name).set(summary.decomposed_layers)
        self.moe_layers.labels(model_name=model_name).set(summary.moe_layers)


class MoESVDStatLogger(StatLoggerBase):
    """Exports the served model's compression as Prometheus gauges; records nothing per request."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.model_name = vllm_config.model_config.served_model_name
        self.engine_index = engine_index
        try:
            self.summary = summarize(vllm_config.model_config.hf_config)
        except SchemaError as error:  # the model itself refuses such a checkpoint at load
            logger.warning("moesvd metrics: not exporting compression metrics: %s", error)
            self.summary = None

        self._counted: tuple[int, int] | None = None  # (routed, skipped) already exported

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if self._counted is None or engine_idx != self.engine_index:
            return
        routed, skipped = read_totals()
        collectors = _Collectors.get()
        collectors.routed_pairs.labels(model_name=self.model_name).inc(max(0, routed - self._counted[0]))
        collectors.skipped_pairs.labels(model_name=self.model_name).inc(max(0, skipped - self._counted[1]))
        self._counted = (max(routed, self._counted[0]), max(skipped, self._counted[1]))

    def log_engine_initialized(self):
        if self.summary is None:
            return
        _Collectors.get().export(self.model_name, self.summary)
        if self.summary.skipping and self.engine_index == 0:
            self._counted = read_totals()  # warm-up and profiling passes are not traffic
            collectors = _Collectors.get()
            collectors.routed_pairs.labels(model_name=self.model_name).inc(0)
            collectors.skipped_pairs.labels(model_name=self.model_name).inc(0)
        if self.summary.compressed:
            logger.info("moesvd metrics: %s compressed with %s, %.1f%% of expert parameters removed",
                        self.model_name, self.summary.method, 100 * self.summary.compression_ratio)
