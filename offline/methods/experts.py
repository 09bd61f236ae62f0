"""What every method does with a built layer's routed experts: views of their weights, per-expert Grams,
the report's error sums, and writing an expert's compressed weights back into the layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from offline import decompose as dec
from offline.calibration import ExpertStatistics, gated_activations, gram
from offline.distributed import Ranks
from offline.expert_tensors import LayerExperts

if TYPE_CHECKING:
    from torch import nn

    from offline.compression_options import CompressionOptions
    from offline.layerwise import LayerwiseModel


def layer_experts(model: LayerwiseModel, layer: nn.Module) -> LayerExperts:
    """Views of the built layer's routed experts (gate/up [E, I, H], down [E, H, I], compute dtype):
    no second copy of the expert weights. The compute dtype holds the stored values exactly (float32,
    or the checkpoint's own bfloat16)."""
    experts = model.moe_block(layer).experts
    gate_up = experts.gate_up_proj.data
    inter = model.dims.intermediate
    return LayerExperts(gate_up[:, :inter], gate_up[:, inter:], experts.down_proj.data, [])


class ExpertGrams:
    """Per-expert Grams formed at the point of use, each with a small prior from the layer-wide average
    (`prior_tokens` tokens of it) and `damp` * mean(diag) on the diagonal; one expert's at a time.

    Across ranks (offline/distributed.py) the expert's rows of every rank's calibration windows are
    gathered in batch order and its Grams formed from them as one process forms them: on every rank
    (`owner` None) or on the rank `owner` only (the others get None), for the expert-parallel stages."""

    def __init__(self, stats: ExpertStatistics, options: CompressionOptions, ranks: Ranks | None = None):
        self.stats, self.options = stats, options
        self.ranks = ranks or Ranks(device=stats.device)
        self.in_prior = stats.gram_layer / max(stats.total_tokens, 1)
        self.mid_prior = stats.gram_mid_sum / max(int(stats.routed_tokens.sum()), 1)

    def _regularized(self, gram: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return dec.regularized_gram(gram, prior, self.options.prior_tokens, self.options.damp, in_place=True)

    def input(self, expert: int, owner: int | None = None) -> torch.Tensor | None:
        """X_e^T X_e [H, H] of the expert's routed inputs, regularised."""
        total = self.stats.input_gram(expert, self.ranks, owner)
        return None if total is None else self._regularized(total, self.in_prior)

    def mid(self, expert: int, owner: int | None = None) -> torch.Tensor | None:
        """Y_e^T Y_e [I, I] of the expert's intermediate activations (the down projection's input),
        regularised; computed from the layer's current expert weights."""
        total = self.stats.mid_gram(expert, self.ranks, owner)
        return None if total is None else self._regularized(total, self.mid_prior)


    def routed_inputs(self, expert: int, owner: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]] | None:
        """The expert's routed rows [T_e, H], their routing weights (None unless `routing_weighted`) and
        rows per batch, of every rank's windows in batch order, on `owner` (None elsewhere)."""
        return self.stats.expert_inputs(expert, self.ranks, owner)

    def output_fit(self, inputs: tuple[torch.Tensor, torch.Tensor | None, list[int]], dense_gate_up: torch.Tensor,
                   fitted_gate_up: torch.Tensor, act_fn: nn.Module) -> OutputFitData | None:
        """What `decompose.fit_output_factor_to_outputs` needs for one expert, over its routed tokens
        (`inputs`, from `routed_inputs`); None without routed tokens."""
        rows, weights, segments = inputs
        if rows.shape[0] == 0:
            return None
        with torch.no_grad():
            dense = gated_activations(dense_gate_up, act_fn, rows)
            fitted = gated_activations(fitted_gate_up, act_fn, rows)
        # the same prior as `mid` on both (an expert with few tokens keeps close to D = B^T W), damping on C'
        cross = dec.regularized_gram(gram(dense, weights, segments, other=fitted), self.mid_prior,
                                     self.options.prior_tokens, 0.0, in_place=True)
        return OutputFitData(dense, fitted, weights, cross, self._regularized(gram(fitted, weights, segments),
                                                                               self.mid_prior))


@dataclass
class OutputFitData:
    """One expert's intermediate activations on its routed tokens, h of its dense [gate; up] and h' of the
    fitted one (compute dtype), and their Grams sum h h'^T and sum h' h'^T [I, I] (regularised, float64)."""

    dense: torch.Tensor  # [T_e, I]
    fitted: torch.Tensor  # [T_e, I]
    weights: torch.Tensor | None  # [T_e] routing weights (with `routing_weighted`)
    cross: torch.Tensor
    gram: torch.Tensor

    def output_error(self, down_weight: torch.Tensor, down: torch.Tensor) -> tuple[float, float]:
        """(sum_t w_t^2 ||D' h'_t - W h_t||^2, sum_t w_t^2 ||W h_t||^2) for the dense down W [H, I] and a
        fitted one D' [H, I] (float32 products, float64 sums)."""
        target = self.dense.float() @ down_weight.float().T
        error = self.fitted.float() @ down.float().T - target
        scale = torch.ones(target.shape[0], device=target.device) if self.weights is None else self.weights.float() ** 2
        return float((error.pow(2).sum(1) * scale).double().sum()), float((target.pow(2).sum(1) * scale).double().sum())


class ErrorSums:
    """The report's relative_error: sum_e ||(W_e - W'_e) X_e^T||^2 / sum_e ||W_e X_e^T||^2 per projection."""

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0.0] for name in ("gate", "up", "down")}

    def add(self, parts: dict[str, tuple[float, float]]) -> None:
        for name, (num, den) in parts.items():
            self.sums[name][0] += num
            self.sums[name][1] += den

    def relative(self) -> dict[str, float]:
        # the fit's error terms can round a zero error to about -1e-17: clamp at zero
        return {name: max(num, 0.0) / den if den > 0 else 0.0 for name, (num, den) in self.sums.items()}


def write_expert(model: LayerwiseModel, layer: nn.Module, expert: int, gate_up: torch.Tensor,
                 down: torch.Tensor) -> None:
    """Make the in-memory layer's expert compute what the compressed checkpoint computes for it:
    `gate_up` [2I, H] ([gate; up]) and `down` [H, I] replace its weights."""
    experts = model.moe_block(layer).experts
    with torch.no_grad():
        experts.gate_up_proj.data[expert].copy_(gate_up)
        experts.down_proj.data[expert].copy_(down)
