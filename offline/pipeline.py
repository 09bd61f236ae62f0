"""The compressor: `compress(model_dir, out_dir, options) -> Path`, a layer-sequential calibration pipeline
that calls the chosen method's hooks (offline/methods/) with one decoder layer in memory.

The calibration windows are embedded once; then, layer by layer, the layer is built from the checkpoint
(offline/layerwise.py, in the checkpoint's dtype when it is bf16, else float32), run on every batch with
hooks that collect its routed experts' statistics (offline/calibration.py), handed to the method, and its
outputs become the next layer's inputs (llm-compressor's sequential pipeline). The stages, each timed with
its peak RSS in report.md/json:
1. calibration data: tokenized and sampled (offline.calibration);
2. sensitivity pass (methods that select layers): f_i (Eq. 9), r_i and a_i (Eq. 10) per expert and S_L
   (Eq. 4) per MoE layer, dense outputs passed on;
3. plan: which layers are compressed and to which shapes, from the method's candidate shapes and
   parameter counts (`make_plan`, offline.sensitivity);
4. decomposition pass: for a planned layer its routed inputs and router choices are kept, the method's
   `compress_layer` compresses it expert by expert and hands each tensor to the writer (spilled to disk)
   and, with `propagate="compressed"`, the layer's outputs are recomputed from what the checkpoint
   computes before they are passed on;
5. write: the format writer (moesvd_vllm.format.writer) checks every tensor against the `moe_svd` block,
   writes shards, index, config.json and side files atomically; then the reports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from moesvd_vllm.architectures import require_servable
from moesvd_vllm.format.safetensors_io import check_output_dir
from moesvd_vllm.format.schema import LayerSpec, decomposed_layer_params, dense_layer_params, expected_layer_tensors
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline import decompose as dec
from offline.calibration import CalibrationSet, ExpertStatistics, ExpertStatisticsHook, load_calibration
from offline.checkpoint_io import expert_tensor_names
from offline.compression_options import CompressionOptions
from offline.expert_tensors import LayerExperts
from offline.heap import release_free_heap
from offline.layerwise import LayerInputs, LayerwiseModel
from offline.methods import CompressedLayer, LayerWork, TensorSink
from offline.methods.experts import layer_experts
from offline.report import LayerReport, StageClock, compression_summary, layer_report, write_reports
from offline.skipping import SkipCalibration
from offline.sensitivity import (
    LayerShape,
    Plan,
    layer_sensitivity,
    monotone_levels,
    plan_decomposition,
    shape_levels,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ batches
def calibration_batches(calib: CalibrationSet, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, attention mask) of consecutive `batch_size` windows."""
    return [(calib.input_ids[i:i + batch_size], calib.attention_mask[i:i + batch_size])
            for i in range(0, calib.input_ids.shape[0], batch_size)]


@dataclass
class HiddenStream:
    """Hidden states of all calibration batches at the current layer, with each batch's layer inputs."""

    hidden: list[torch.Tensor]
    inputs: list[LayerInputs]
    masks: list[torch.Tensor]  # [B, L] bool, True = real token


def embed_calibration(model: LayerwiseModel, calib: CalibrationSet, batch_size: int) -> HiddenStream:
    """The stream at the first decoder layer: embeddings, masks and rotary embeddings per batch."""
    hidden, inputs, masks = [], [], []
    for ids, mask in calibration_batches(calib, batch_size):
        h = model.embed(ids)
        hidden.append(h)
        inputs.append(model.layer_inputs(h, mask))
        masks.append(mask.bool())
    return HiddenStream(hidden, inputs, masks)


def run_layer(model: LayerwiseModel, layer: nn.Module, index: int, stream: HiddenStream,
              hook: ExpertStatisticsHook | None, desc: str) -> list[torch.Tensor]:
    """The layer's outputs on every batch of `stream` (the hook, when given, sees only real tokens)."""
    outputs = []
    for h, inp, mask in tqdm(list(zip(stream.hidden, stream.inputs, stream.masks)), desc=desc,
                             leave=False, disable=None):
        if hook is not None:
            hook.token_mask = mask.reshape(-1)
        outputs.append(model.run_layer(layer, index, h, inp))
    return outputs


def collect_statistics(model: LayerwiseModel, layer: nn.Module, index: int, stream: HiddenStream,
                       collect_grams: bool, desc: str, routing_weighted: bool = False
                       ) -> tuple[ExpertStatistics, list[torch.Tensor]]:
    """Run the layer with the statistics hook on its routed experts: (statistics, outputs). With
    `collect_grams` the routed inputs are kept for the per-expert Grams."""
    dims = model.dims
    stats = ExpertStatistics(dims.num_experts, dims.hidden, dims.intermediate, collect_grams=collect_grams,
                             routing_weighted=routing_weighted)
    experts = model.moe_block(layer).experts
    hook = ExpertStatisticsHook(stats, experts)
    # after each batch: the per-expert temporaries of the forward and the hook vary in size
    trim = experts.register_forward_hook(lambda *_: release_free_heap())
    try:
        outputs = run_layer(model, layer, index, stream, hook, desc)
    finally:
        hook.remove()
        trim.remove()
    return stats, outputs


# ------------------------------------------------------------------------------------------ sensitivity pass
@dataclass
class LayerSensitivity:
    score: float  # S_L (Eq. 4)
    frequency: torch.Tensor  # f_i (Eq. 9)
    principal_rank: torch.Tensor  # r_i
    outlier_ratio: torch.Tensor  # a_i (Eq. 10)


def principal_ranks(experts: LayerExperts, threshold: float) -> torch.Tensor:
    """r_i per expert: the principal rank averaged over its gate, up and down matrices."""
    ranks = [sum(dec.principal_rank(w[e], threshold) for w in (experts.gate, experts.up, experts.down)) / 3
             for e in range(experts.gate.shape[0])]
    return torch.tensor(ranks, dtype=torch.float64)


def sensitivity_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions
                     ) -> dict[int, LayerSensitivity]:
    """f_i, a_i, r_i and S_L for every MoE layer, passing dense outputs on. a_i needs tau * the mean
    |activation| of each expert first, so a MoE layer runs twice: statistics, then outlier counts."""
    stream = embed_calibration(model, calib, options.batch_size)
    result: dict[int, LayerSensitivity] = {}
    for index in tqdm(range(model.num_layers), desc="sensitivity", disable=None):
        layer = model.build_layer(index)
        if index in model.moe_layers:
            stats, outputs = collect_statistics(model, layer, index, stream, False, f"layer {index} stats")
            hook = ExpertStatisticsHook(stats, model.moe_block(layer).experts)
            hook.outlier_threshold = options.outlier_tau * stats.mean_abs_activation
            try:
                run_layer(model, layer, index, stream, hook, f"layer {index} outliers")
            finally:
                hook.remove()
            ranks = principal_ranks(layer_experts(model, layer), options.rank_threshold)
            freq, outliers = stats.frequency, stats.outlier_ratio()
            result[index] = LayerSensitivity(layer_sensitivity(freq, ranks, outliers), freq, ranks, outliers)
            logger.info("layer %d: S_L = %.4g", index, result[index].score)
        else:
            outputs = run_layer(model, layer, index, stream, None, f"layer {index}")
        stream.hidden = outputs
        del layer
    return result


# ------------------------------------------------------------------------------------------ plan
def make_plan(model: LayerwiseModel, options: CompressionOptions,
              sensitivity: dict[int, LayerSensitivity] | None) -> Plan:
    """Which layers are compressed and to which shapes, from the method's candidate shapes and counts."""
    dims, method = model.dims, options.make_method()
    scores = {i: (sensitivity[i].score if sensitivity else 0.0) for i in model.moe_layers}
    max_rank, rank_step = method.rank_steps(dims)
    candidates = shape_levels(hidden=dims.hidden, intermediate=dims.intermediate, rank_step=rank_step,
                              max_rank=max_rank, intermediate_step=options.intermediate_step,
                              min_intermediate_fraction=options.effective_min_intermediate_fraction)

    def layer_params(shape: LayerShape) -> int:
        return decomposed_layer_params(method.counting_spec(dims, shape), dims)

    dense = dense_layer_params(dims)
    return plan_decomposition(
        scores, options.ratio, dense_layer=dense, levels=monotone_levels(candidates, layer_params, dense),
        layer_params=layer_params, tolerance=options.ratio_tolerance,
        min_kept_fraction=options.min_kept_fraction, decompose_all=options.effective_selection == "all")


# ------------------------------------------------------------------------------------------ one layer
def decompose_layer(model: LayerwiseModel, index: int, layer: nn.Module, stats: ExpertStatistics,
                    shape: LayerShape, options: CompressionOptions, sensitivity: float | None,
                    add: Callable[[str, torch.Tensor], None], write_back: bool = False) -> CompressedLayer:
    """Compress the routed experts of the built `layer` (its weights are the dense ones) with the options'
    method, handing each written tensor to `add` as soon as it exists. With `write_back` each expert's
    weights in `layer` are replaced by what the compressed checkpoint computes, after its Grams."""
    work = LayerWork(model, index, layer, stats, shape, sensitivity, write_back, TensorSink(add))
    result = options.make_method().compress_layer(work)
    expected = expected_layer_tensors(model.model_type, index, result.spec, model.dims, model.expert_dtype())
    if result.written != expected:  # a bug in the method, never a user error: say what and where
        differing = [f"{name}: wrote {result.written.get(name)}, the schema needs {expected.get(name)}"
                     for name in sorted(set(result.written) | set(expected))
                     if result.written.get(name) != expected.get(name)]
        raise AssertionError(
            f"layer {index}: method {options.method!r} wrote tensors that differ from its own layer spec "
            f"(rank {result.spec.rank}, banks {result.spec.num_banks}, kept neurons {result.spec.intermediate}); "
            f"nothing was written to the output. {'; '.join(differing[:3])}. This is a bug of the method: "
            "please report it with the model's config.json; another --method or --ratio may avoid it")
    return result


# ------------------------------------------------------------------------------------------ decomposition pass
def _copy_layer_tensors(model: LayerwiseModel, writer: CompressedCheckpointWriter, index: int,
                        replaced: set[str]) -> None:
    for name in model.layer_tensor_names(index):
        if name not in replaced:
            writer.add(name, model.tensors.get(name), stage=COPIED)


def decomposition_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions, plan: Plan,
                       sensitivity: dict[int, LayerSensitivity] | None, writer: CompressedCheckpointWriter,
                       skip: SkipCalibration | None = None) -> tuple[dict[str, LayerSpec], list[LayerReport]]:
    """Every layer's tensors to `writer`: planned layers compressed by the method, the others copied; the
    layers after the last planned one are not run (unless `skip` calibrates expert skipping on every MoE
    layer: it watches each MoE layer's routing, offline/skipping.py)."""
    stream = embed_calibration(model, calib, options.batch_size)
    skip = skip or SkipCalibration(options.skip_choice, model.moe_layers)
    last_needed = model.num_layers - 1 if skip.active else max(plan.ranks)
    specs: dict[str, LayerSpec] = {}
    reports: list[LayerReport] = []
    dense = dense_layer_params(model.dims)
    for index in tqdm(range(model.num_layers), desc=f"{options.method} decomposition", disable=None):
        score = sensitivity[index].score if sensitivity and index in sensitivity else None
        measured = sensitivity.get(index) if sensitivity else None
        if index not in plan.ranks:
            _copy_layer_tensors(model, writer, index, set())
            if index <= last_needed:
                layer = model.build_layer(index)
                with skip.watching(_experts_of(model, layer, index), index, stream.masks):
                    stream.hidden = run_layer(model, layer, index, stream, None, f"layer {index}")
            if index in model.moe_layers:
                reports.append(layer_report(index, score, measured, None, dense, model.dims))
            continue
        release_free_heap()
        layer = model.build_layer(index)
        with skip.watching(model.moe_block(layer).experts, index, stream.masks):
            stats, outputs = collect_statistics(model, layer, index, stream, True, f"layer {index} grams",
                                                options.routing_weighted)
        write_back = options.propagate == "compressed" and index < last_needed
        replaced = set(expert_tensor_names(model.tensors, model.model_type, index, model.dims.num_experts))
        _copy_layer_tensors(model, writer, index, replaced)
        result = decompose_layer(model, index, layer, stats, plan.shapes[index], options, score, writer.add,
                                 write_back)
        del stats  # the routed inputs
        logger.info("layer %d: rank %d, banks %d, relative errors %s", index, result.spec.rank,
                    result.spec.num_banks, {k: round(v, 5) for k, v in result.relative_error.items()})
        specs[str(index)] = result.spec
        reports.append(layer_report(index, score, measured, result, dense, model.dims))
        if write_back:  # the layer now computes what the checkpoint computes: pass its outputs on
            del outputs
            outputs = run_layer(model, layer, index, stream, None, f"layer {index} compressed")
        stream.hidden = outputs
        del layer, result
    return specs, reports


def _experts_of(model: LayerwiseModel, layer: nn.Module, index: int) -> nn.Module | None:
    return model.moe_block(layer).experts if index in model.moe_layers else None


# ------------------------------------------------------------------------------------------ compress
def compress(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: CompressionOptions) -> Path:
    """Compress `model_dir` into a new checkpoint at `out_dir` (the stages of the module docstring)."""
    torch.manual_seed(options.seed)
    out_dir = check_output_dir(out_dir, options.force)
    clock = StageClock()
    model = LayerwiseModel(model_dir)
    require_servable(model.model_type, offline_only=not options.method_class.servable)
    with clock.stage("calibration data"):
        calib = load_calibration(options.calib, model_dir, options.num_samples, options.seq_len, options.seed)
    logger.info("calibration: %d x %d tokens from %s (sha256 %s)", calib.info.num_samples,
                calib.info.seq_len, calib.info.source, calib.info.sha256[:12])
    sensitivity = None
    if options.effective_selection == "sensitivity":
        with clock.stage("sensitivity pass"):
            sensitivity = sensitivity_pass(model, calib, options)
    with clock.stage("plan"):
        plan = make_plan(model, options, sensitivity)
    logger.info("plan: decompose layers %s at (rank, neurons) %s -> ratio %.4f (target %.4f)",
                list(plan.shapes), [(x.rank, x.intermediate) for x in plan.shapes.values()], plan.ratio,
                options.ratio)
    with CompressedCheckpointWriter(model.raw_config, out_dir, replace=options.force,
                                    max_shard_bytes=options.max_shard_bytes) as writer:
        with clock.stage("decomposition pass"), writer.stage(f"the {options.method} decomposition"):
            skip = SkipCalibration(options.skip_choice, model.moe_layers)
            specs, reports = decomposition_pass(model, calib, options, plan, sensitivity, writer, skip)
        with clock.stage("write"):
            for name in model.non_layer_tensor_names():
                writer.add(name, model.tensors.get(name), stage=COPIED)
            block = writer.finish(method=options.method, layers=specs, options=options.recorded(),
                                  calibration=calib.info, side_files_from=model.model_dir,
                                  skipping=skip.spec())
        summary = compression_summary(model, options, plan, block, calib.info)
        write_reports(writer.directory, summary, reports, clock.stages)
    logger.info("wrote %s: ratio %.4f, decomposed layers %s", out_dir, block.params.ratio,
                block.decomposed_layers)
    return out_dir
