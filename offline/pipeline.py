"""The layer-sequential calibration pipeline: one decoder layer in memory, its statistics, the method's hooks.

The calibration windows are embedded once; then, layer by layer, the layer is built from the checkpoint
(offline/layerwise.py), run on every batch with hooks that collect its routed experts' statistics
(offline/calibration.py), handed to the method, and its outputs become the next layer's inputs
(llm-compressor's sequential pipeline). Two such passes:

* the sensitivity pass (methods that select layers): f_i (Eq. 9), r_i and a_i (Eq. 10) per expert and S_L
  (Eq. 4) per MoE layer, dense outputs passed on;
* the compression pass: for a planned layer its routed inputs are kept, `CompressionMethod.compress_layer`
  decomposes it and, with `propagate="compressed"`, the layer's outputs are recomputed from what the
  checkpoint computes before they are passed on.

Between them the plan (`make_plan`) picks each layer's shape from the method's candidate shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from moesvd_vllm.format.schema import decomposed_layer_params, dense_layer_params, expected_layer_tensors
from offline import decompose as dec
from offline.calibration import CalibrationSet, ExpertStatistics, ExpertStatisticsHook
from offline.compression_options import CompressionOptions
from offline.expert_tensors import LayerExperts
from offline.heap import release_free_heap
from offline.layerwise import LayerInputs, LayerwiseModel
from offline.methods import CompressedLayer, LayerWork, TensorSink
from offline.methods.experts import layer_experts
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
    if result.written != expected:  # a bug in the method, never a user error
        raise AssertionError(f"layer {index}: written tensors differ from the schema: "
                             f"{sorted(set(result.written) ^ set(expected))[:4]} ...")
    return result
