"""The calibration stream of the layer-sequential pipeline: every calibration batch's hidden states at the
current decoder layer, the layer run on them (optionally with the statistics hook on its routed experts),
and its outputs passed on as the next layer's inputs. Under torch.distributed each rank holds every
`ranks.size`-th batch and the statistics are summed over ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from offline.calibration import ExpertStatistics, ExpertStatisticsHook
from offline.calibration_data import CalibrationSet
from offline.distributed import Ranks
from offline.heap import release_free_heap
from offline.layerwise import LayerInputs, LayerwiseModel


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


def embed_calibration(model: LayerwiseModel, calib: CalibrationSet, batch_size: int,
                      ranks: Ranks | None = None) -> HiddenStream:
    """The stream at the first decoder layer: embeddings, masks and rotary embeddings per batch (this
    rank's batches: every `ranks.size`-th)."""
    hidden, inputs, masks = [], [], []
    for ids, mask in (ranks or Ranks()).my_share(calibration_batches(calib, batch_size)):
        mask = mask.to(model.device)
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
                       collect_grams: bool, desc: str, routing_weighted: bool = False,
                       ranks: Ranks | None = None) -> tuple[ExpertStatistics, list[torch.Tensor]]:
    """Run the layer with the statistics hook on its routed experts: (statistics, outputs), the sums
    added up over `ranks`. With `collect_grams` the routed inputs are kept for the per-expert Grams."""
    dims = model.dims
    stats = ExpertStatistics(dims.num_experts, dims.hidden, dims.intermediate, collect_grams=collect_grams,
                             routing_weighted=routing_weighted, device=model.device)
    experts = model.moe_block(layer).experts
    hook = ExpertStatisticsHook(stats, experts)
    # after each batch: the per-expert temporaries of the forward and the hook vary in size
    trim = experts.register_forward_hook(lambda *_: release_free_heap())
    try:
        outputs = run_layer(model, layer, index, stream, hook, desc)
    finally:
        hook.remove()
        trim.remove()
    stats.sum_over_ranks(ranks or Ranks())
    return stats, outputs
