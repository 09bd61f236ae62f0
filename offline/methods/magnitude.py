""""magnitude-neurons": the neuron-pruning baseline users run instead of MoE-SVD.

Per expert it keeps the intermediate neurons of largest ||W_gate[i, :]||_2 ||W_up[i, :]||_2 ||W_down[:, i]||_2
(`offline.slimming.magnitude_scores`): no calibration statistics in the choice and no compensation of down
(the kept weights are the dense ones). Every MoE layer is reduced (selection "all") and the plan lowers the
layers one `intermediate_step` of neurons at a time, evenly, until the removed share of routed-expert
parameters reaches the ratio: every expert of every layer keeps the same I' when the ratio is a multiple of
intermediate_step / I (e.g. 0.25 and 0.5 for I = 256, step 32); otherwise layers may differ by one step
(within --ratio-tolerance). The checkpoint is the normal shared-basis form without bases (r = H), which the
plugin and `offline.eval_ppl` read like any neuron-selected layer of "moe-svd-stacked".

The pipeline still runs its calibration pass (its per-layer error report uses the Grams); the selection does
not read them. Ratios that would need fewer than `intermediate_step` neurons per expert are refused (that
would take the rank reduction of the shared-basis methods, which this baseline does not do).
"""

from __future__ import annotations

import logging

import torch

from offline.expert_tensors import LayerExperts
from offline.methods.base import LayerWork
from offline.methods.default import StackedSharedBases
from offline.methods.experts import ExpertGrams
from offline.sensitivity import RatioError
from offline.slimming import magnitude_slim_in_place

logger = logging.getLogger(__name__)


class MagnitudeNeurons(StackedSharedBases):
    name = "magnitude-neurons"
    summary = ("baseline: per expert keep the neurons of largest ||gate_i|| ||up_i|| ||down_i|| (no calibration "
               "statistics, no compensation), all layers alike (servable)")
    selection = "all"
    min_intermediate_fraction = 1e-6  # neurons only: down to one intermediate_step per expert

    def compress_layer(self, work: LayerWork):
        if work.shape.bases:
            step = self.options.intermediate_step
            raise RatioError(
                f"magnitude-neurons removes neurons only: ratio {self.options.ratio} needs fewer than "
                f"{step} neurons per expert in layer {work.index} (at most "
                f"{1 - step / work.dims.intermediate:.3f} of the routed-expert parameters); use a smaller "
                "ratio or a smaller --intermediate-step")
        return super().compress_layer(work)

    def _select_neurons(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams
                        ) -> tuple[list[torch.Tensor], float | None]:
        inter, keep = work.dims.intermediate, work.shape.intermediate
        if keep >= inter:
            return super()._select_neurons(work, experts, grams)
        kept = magnitude_slim_in_place(experts.gate, experts.up, experts.down, keep)
        logger.info("layer %d: kept the %d of %d largest-magnitude neurons per expert", work.index, keep, inter)
        return kept, None
