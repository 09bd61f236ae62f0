"""Layer sensitivity (Eq. 4) and the selective-decomposition plan: which layers, at which ranks.

S_L = sum_i f_i * r_i * a_i, with f_i the routing frequency (Eq. 9), r_i the principal rank of expert i
(singular values above `rank_threshold` times the largest, averaged over its gate, up and down matrices)
and a_i its activation-outlier ratio (Eq. 10).

The plan decomposes the least sensitive layers so that the routed-expert parameters removed match the
target ratio within `tolerance`. For m = 1, 2, ... least-sensitive layers it starts every chosen layer at
its largest useful rank and lowers ranks one `rank_step` at a time, always the highest-ranked layer and
among equals the least sensitive, until the target is met; it keeps the smallest m whose ranks all stay
at or above `min_rank_fraction` of full rank (the paper's "preserve sensitive layers"), or, when none
does, the feasible m with the largest minimum rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class RatioError(ValueError):
    """The requested compression ratio is invalid or cannot be reached."""


def layer_sensitivity(frequency: torch.Tensor, principal_ranks: torch.Tensor,
                      outlier_ratio: torch.Tensor) -> float:
    """S_L of Eq. 4."""
    return float((frequency.double() * principal_ranks.double() * outlier_ratio.double()).sum())


@dataclass(frozen=True)
class Plan:
    ranks: dict[int, int]  # decomposed layer -> rank
    expert_dense: int  # routed-expert parameters of the dense model
    expert_compressed: int

    @property
    def ratio(self) -> float:
        return 1.0 - self.expert_compressed / self.expert_dense


def _lower_one_step(ranks: dict[int, int], position: dict[int, int], rank_step: int) -> bool:
    """Lower the highest rank (ties: the least sensitive layer) by one step; False if all are minimal."""
    candidates = [layer for layer, r in ranks.items() if r > rank_step]
    if not candidates:
        return False
    layer = max(candidates, key=lambda L: (ranks[L], -position[L]))
    ranks[layer] -= rank_step
    return True


def plan_decomposition(sensitivity: dict[int, float], target_ratio: float, *,
                       dense_layer: int, decomposed_layer: Callable[[int], int], max_rank: int,
                       rank_step: int, tolerance: float, min_rank_fraction: float,
                       decompose_all: bool) -> Plan:
    """Choose layers and ranks (see the module docstring). `decomposed_layer(rank)` counts a decomposed
    layer's expert parameters; `dense_layer` a dense layer's."""
    if not 0.0 < target_ratio < 1.0:
        raise RatioError(f"compression ratio must be strictly between 0 and 1, got {target_ratio}")
    layers = sorted(sensitivity)
    total = dense_layer * len(layers)
    top_rank = (max_rank // rank_step) * rank_step
    while top_rank > 0 and decomposed_layer(top_rank) >= dense_layer:
        top_rank -= rank_step
    if top_rank <= 0:
        raise RatioError(f"no rank (multiple of {rank_step}) makes a decomposed layer smaller than a dense "
                         "one for this model's shapes; this method cannot compress it")
    order = sorted(layers, key=lambda L: (sensitivity[L], L))  # least sensitive first
    position = {layer: i for i, layer in enumerate(order)}
    counts = [len(order)] if decompose_all else range(1, len(order) + 1)
    feasible: list[Plan] = []
    achieved: list[float] = []

    def removed(chosen: dict[int, int]) -> int:
        return sum(dense_layer - decomposed_layer(r) for r in chosen.values())

    for m in counts:
        ranks = {layer: top_rank for layer in order[:m]}
        previous = dict(ranks)
        while removed(ranks) < target_ratio * total:
            previous = dict(ranks)
            if not _lower_one_step(ranks, position, rank_step):
                break
        # the last step may overshoot: keep whichever of the last two states is closer to the target
        if abs(removed(previous) - target_ratio * total) < abs(removed(ranks) - target_ratio * total):
            ranks = previous
        plan = Plan(dict(sorted(ranks.items())), total, total - removed(ranks))
        achieved.append(plan.ratio)
        if abs(plan.ratio - target_ratio) <= tolerance:
            feasible.append(plan)
    if not feasible:
        raise RatioError(
            f"compression ratio {target_ratio:.3f} is not reachable within {tolerance:.3f} with ranks in "
            f"steps of {rank_step}: achievable ratios here are around "
            f"{sorted(set(round(a, 3) for a in achieved))}; pick a ratio near one of them or raise "
            "the tolerance (--ratio-tolerance)")
    floor = min_rank_fraction * max_rank
    for plan in feasible:
        if min(plan.ranks.values()) >= floor:
            return plan
    return max(feasible, key=lambda p: (min(p.ranks.values()), -len(p.ranks)))
