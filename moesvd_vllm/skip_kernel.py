"""Dynamic expert skipping inside vLLM's fused MoE: the rule of moesvd_vllm/skipping.py applied to the
router's result, and only the kept (token, expert) pairs handed to vLLM's own fused-experts kernel.

vLLM 0.32's CPU kernel (`torch.ops._C.cpu_fused_moe`, `CPUUnquantizedExperts`) has no expert map and
indexes its per-expert token counts with the expert id, so an id of -1 writes outside its buffer (the GPU
Triton path instead skips blocks whose expert id is -1 after `expert_map` remapping: docs/performance.md).
Zeroing a weight would still compute the pair. So the kept pairs become the rows of a top-1 problem: the
kernel sees P = kept pairs instead of T x k, each row the token's hidden state, and the rows are summed
back per token. The method runs inside vLLM's opaque `moe_forward` custom op, so the data-dependent P does
not reach torch.compile.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

from moesvd_vllm.skip_stats import PairCounter
from moesvd_vllm.skipping import combine_pairs, keep_mask, kept_pairs, kept_weights

logger = logging.getLogger("vllm.moesvd_vllm.skip_kernel")


def run_skipping(moe_kernel, *, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, beta: float, renormalize: bool, count: bool,
                 shared_experts, shared_experts_input, **kernel_args) -> torch.Tensor:
    """`moe_kernel.apply(...)` on the pairs the rule keeps (see the module docstring)."""
    keep = keep_mask(topk_weights, beta)
    weights = kept_weights(topk_weights, keep, renormalize).to(topk_weights.dtype)
    pairs = kept_pairs(hidden_states, weights, topk_ids, keep)
    if count:
        routed = topk_ids.numel()
        PairCounter.get().add(routed, routed - pairs.ids.shape[0])
    if shared_experts is not None and shared_experts_input is None:
        shared_experts_input = hidden_states
    out = moe_kernel.apply(hidden_states=pairs.hidden, topk_weights=pairs.weights, topk_ids=pairs.ids,
                           shared_experts=shared_experts, shared_experts_input=shared_experts_input,
                           **kernel_args)
    return combine_pairs(out, pairs)


class SkippingUnquantizedMethod(UnquantizedFusedMoEMethod):
    """vLLM's unquantized fused-MoE method of a MoE layer the checkpoint left dense, with skipping."""

    def __init__(self, moe, beta: float, layer_index: int):
        super().__init__(moe)
        self.beta = beta
        self.layer_index = layer_index
        parallel = moe.moe_parallel_config
        self.count = (parallel.ep_rank if parallel.use_ep else parallel.tp_rank) == 0

    @property
    def supports_eplb(self) -> bool:
        return False

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        if self.moe_kernel.is_monolithic or layer.expert_map is not None:
            from moesvd_vllm.layers import CompressionConfigError

            raise CompressionConfigError(
                f"decoder layer {self.layer_index}: expert skipping needs a modular fused-MoE kernel without an "
                f"expert map, vLLM picked {type(self.moe_kernel.fused_experts).__name__}"
                f"{' with expert parallelism' if layer.expert_map is not None else ''}; serve without "
                "--enable-expert-parallel or disable skipping (MOESVD_SKIP_BETA=off)")

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if self.beta == 0.0:  # nothing to skip: vLLM's own path
            return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        return run_skipping(
            self.moe_kernel, hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids, beta=self.beta,
            renormalize=layer.renormalize, count=self.count, shared_experts=shared_experts,
            shared_experts_input=shared_experts_input, w1=layer.w13_weight, w2=layer.w2_weight,
            activation=layer.activation, apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=layer.global_num_experts, expert_map=None)
