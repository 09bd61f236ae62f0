"""Layer sensitivity (Eq. 4) and the selective-decomposition plan: which layers, at which shapes.

S_L = sum_i f_i * r_i * a_i, with f_i the routing frequency (Eq. 9), r_i the principal rank of expert i
(singular values above `rank_threshold` times the largest, averaged over its gate, up and down matrices)
and a_i its activation-outlier ratio (Eq. 10).

A decomposed layer takes one of a list of `LayerShape`s ("levels", largest first, each strictly smaller
in parameters than the one before; `pipeline.make_plan` builds the list from the method's options: rank
steps of 32, intermediate-neuron steps of 8, or both). The plan decomposes the least sensitive layers so
that the routed-expert parameters removed match the target ratio within `tolerance`. For m = 1, 2, ...
least-sensitive layers it starts every chosen layer at the first level and lowers one layer one level at a
time, always the layer that keeps the most parameters and among equals the least sensitive, until the
target is met; it keeps the smallest m whose layers all keep at least `min_kept_fraction` of a dense
layer's parameters (the paper's "preserve sensitive layers"), or, when none does, the feasible m with the
largest minimum kept fraction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moesvd_vllm.errors import MoESVDError

logger = logging.getLogger(__name__)


class RatioError(MoESVDError):
    """The requested compression ratio is invalid or cannot be reached."""


def layer_sensitivity(frequency: torch.Tensor, principal_ranks: torch.Tensor,
                      outlier_ratio: torch.Tensor) -> float:
    """S_L of Eq. 4."""
    return float((frequency.double() * principal_ranks.double() * outlier_ratio.double()).sum())


@dataclass(frozen=True)
class LayerShape:
    """What a decomposed layer keeps: rank r of the shared space (or per-expert rank), intermediate neurons
    I' per expert, and whether the shared bases are stored (False only for r = H: neuron selection alone)."""

    rank: int
    intermediate: int
    bases: bool = True


@dataclass(frozen=True)
class Plan:
    shapes: dict[int, LayerShape]  # decomposed layer -> shape
    expert_dense: int  # routed-expert parameters of the dense model
    expert_compressed: int

    @property
    def ranks(self) -> dict[int, int]:
        return {layer: shape.rank for layer, shape in self.shapes.items()}

    @property
    def ratio(self) -> float:
        return 1.0 - self.expert_compressed / self.expert_dense


def monotone_levels(candidates: list[LayerShape], params: Callable[[LayerShape], int],
                    dense_layer: int) -> list[LayerShape]:
    """`candidates` in order, keeping only those strictly smaller than a dense layer and than every level
    kept before them (so lowering a layer one level always removes parameters)."""
    levels: list[LayerShape] = []
    bound = dense_layer
    for shape in candidates:
        if params(shape) < bound:
            levels.append(shape)
            bound = params(shape)
    return levels


def plan_decomposition(sensitivity: dict[int, float], target_ratio: float, *,
                       dense_layer: int, levels: list[LayerShape], layer_params: Callable[[LayerShape], int],
                       tolerance: float, min_kept_fraction: float, decompose_all: bool) -> Plan:
    """Choose layers and shapes (see the module docstring). `levels` must come from `monotone_levels`;
    `layer_params(shape)` counts a decomposed layer's expert parameters, `dense_layer` a dense layer's."""
    if not 0.0 < target_ratio < 1.0:
        raise RatioError(f"compression ratio must be strictly between 0 and 1, got {target_ratio}")
    if not levels:
        raise RatioError("no rank or intermediate size makes a decomposed layer smaller than a dense one for "
                         "this model's shapes; this method cannot compress it")
    layers = sorted(sensitivity)
    total = dense_layer * len(layers)
    cost = [layer_params(shape) for shape in levels]
    order = sorted(layers, key=lambda L: (sensitivity[L], L))  # least sensitive first
    position = {layer: i for i, layer in enumerate(order)}
    counts = [len(order)] if decompose_all else range(1, len(order) + 1)
    feasible: list[Plan] = []
    achieved: list[float] = []

    def removed(chosen: dict[int, int]) -> int:
        return sum(dense_layer - cost[level] for level in chosen.values())

    def lower_one(chosen: dict[int, int]) -> bool:
        candidates = [layer for layer, level in chosen.items() if level + 1 < len(levels)]
        if not candidates:
            return False
        layer = max(candidates, key=lambda L: (cost[chosen[L]], -position[L]))
        chosen[layer] += 1
        return True

    for m in counts:
        chosen = {layer: 0 for layer in order[:m]}
        previous = dict(chosen)
        while removed(chosen) < target_ratio * total:
            previous = dict(chosen)
            if not lower_one(chosen):
                break
        # the last step may overshoot: keep whichever of the last two states is closer to the target
        if abs(removed(previous) - target_ratio * total) < abs(removed(chosen) - target_ratio * total):
            chosen = previous
        plan = Plan({layer: levels[chosen[layer]] for layer in sorted(chosen)}, total, total - removed(chosen))
        achieved.append(plan.ratio)
        if abs(plan.ratio - target_ratio) <= tolerance:
            feasible.append(plan)
    if not feasible:
        raise RatioError(
            f"compression ratio {target_ratio:.3f} is not reachable within {tolerance:.3f} with this method's "
            f"steps (ranks in multiples of 32, intermediate sizes in multiples of 8): achievable ratios here "
            f"are around {sorted(set(round(a, 3) for a in achieved))}; pick a ratio near one of them or "
            "raise the tolerance (--ratio-tolerance)")

    def kept_fraction(plan: Plan) -> float:
        return min(layer_params(shape) for shape in plan.shapes.values()) / dense_layer

    for plan in feasible:
        if kept_fraction(plan) >= min_kept_fraction:
            return plan
    return max(feasible, key=lambda p: (kept_fraction(p), -len(p.shapes)))


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def shape_levels(*, hidden: int, intermediate: int, rank_step: int, max_rank: int,
                 intermediate_step: int, min_intermediate_fraction: float) -> list[LayerShape]:
    """Candidate layer shapes, largest first (filter them with `monotone_levels`).

    With `min_intermediate_fraction` f < 1 (the default method): first fewer intermediate neurons at full
    rank and without bases (r = H), in steps of `intermediate_step` down to ceil(f I); then, at that
    intermediate size, ranks from the largest multiple of `rank_step` <= `max_rank` down, with bases.
    With f = 1: ranks only (the paper's MoE-SVD and the per-expert baselines)."""
    if not 0.0 < min_intermediate_fraction <= 1.0:
        raise ValueError(f"min_intermediate_fraction must be in (0, 1], got {min_intermediate_fraction}")
    floor = intermediate
    shapes: list[LayerShape] = []
    if min_intermediate_fraction < 1.0:
        floor = min(intermediate, max(intermediate_step,
                                      _round_up(min_intermediate_fraction * intermediate, intermediate_step)))
        top = (intermediate - 1) // intermediate_step * intermediate_step
        shapes += [LayerShape(hidden, i, bases=False) for i in range(top, floor - 1, -intermediate_step)]
    top_rank = (max_rank // rank_step) * rank_step
    shapes += [LayerShape(r, floor, bases=True) for r in range(top_rank, 0, -rank_step)]
    return shapes
