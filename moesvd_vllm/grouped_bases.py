"""Group-wise bases (format version 4, `basis_groups` G > 1) inside vLLM's fused MoE: each routed
(token, expert) pair runs in the rank space of its expert's group.

Expert e of group g computes B_g down_k(act(gate_k(A_g x)) * up_k(A_g x)) (App. D.4's group-wise V-sharing;
G = E gives every expert its own bases). The pairs are sorted by group; each group's segment of rows is
projected by its own A_g [r, H] (one batched GEMM over the groups, each padded to the largest group's row
count: a token pays k r H, not G r H, and no Python loop runs per group), and all rows then form one top-1
problem for vLLM's own fused-experts kernel in the r-dimensional space, each row with its bank id (as dynamic skipping does, moesvd_vllm/skip_kernel.py: the CPU kernel has no expert
map). The kernel's weighted [P, r] outputs go back through their group's B_g [H, r] (batched the same
way) and are summed per token in float32. The method runs inside vLLM's opaque `moe_forward` custom op, so the data-dependent pair
count P does not reach torch.compile.

The stacked bases are plain parameters (checkpoint names `moe_svd_in.weight` [G r, H] and
`moe_svd_out.weight` [H, G r]) read in slices, not vLLM linear layers: a CPU linear layer may repack its
weight, and one GEMM over all G stacked groups would cost G r H per token. B is rearranged once at load
into B_g^T [G, r, H] for the batched GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moesvd_vllm.skip_stats import PairCounter
from moesvd_vllm.skipping import keep_mask, kept_weights


class StackedBasis(nn.Module):
    """A parameter `weight` under the checkpoint's basis name, loaded as stored (shape checked)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, name: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load
        self.checkpoint_name = name

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != tuple(param.shape):
            from moesvd_vllm.layers import CompressionConfigError

            raise CompressionConfigError(f"tensor {self.checkpoint_name}: shape {list(loaded.shape)}, expected "
                                         f"{list(param.shape)} (groups x rank, hidden)")
        param.data.copy_(loaded)


@dataclass
class GroupedBases:
    """What the grouped path needs of one layer: the bases per group and the expert -> group / bank maps."""

    input_basis: torch.Tensor  # [G, r, H]: A_g
    output_basis: torch.Tensor  # [G, r, H]: B_g^T
    group_of_expert: torch.Tensor  # [E] int64
    bank_of_expert: torch.Tensor  # [E] int64

    @property
    def groups(self) -> int:
        return self.input_basis.shape[0]


def per_group_views(input_weight: torch.Tensor, output_weight: torch.Tensor, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored [G r, H] and [H, G r] bases as A_g [G, r, H] (a view) and B_g^T [G, r, H] (a copy,
    made once at load: the checkpoint keeps B's stacked layout)."""
    hidden = input_weight.shape[1]
    rank = input_weight.shape[0] // groups
    return (input_weight.view(groups, rank, hidden),
            output_weight.view(hidden, groups, rank).permute(1, 2, 0).contiguous())


def _routed_pairs(topk_weights: torch.Tensor, skip_beta: float, renormalize: bool, count: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot, weights) of the pairs that reach the kernel: all of them, or the ones dynamic skipping
    keeps (moesvd_vllm/skipping.py) with their renormalised weights."""
    if skip_beta <= 0.0:
        token, slot = torch.ones_like(topk_weights, dtype=torch.bool).nonzero(as_tuple=True)
        return token, slot, topk_weights
    keep = keep_mask(topk_weights, skip_beta)
    weights = kept_weights(topk_weights, keep, renormalize).to(topk_weights.dtype)
    token, slot = keep.nonzero(as_tuple=True)
    if count:
        PairCounter.get().add(topk_weights.numel(), topk_weights.numel() - token.numel())
    return token, slot, weights


def _padded_slots(group: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """Each row's position within its group (rows sorted by group) and the largest group's row count: the
    rows of group g go to [g, position] of a [G, n, .] batch, so one batched GEMM serves every group."""
    counts = torch.bincount(group, minlength=groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(group.shape[0], device=group.device) - starts[group]
    return position, int(counts.max()) if group.numel() else 0


def run_grouped(moe_kernel, bases: GroupedBases, *, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, skip_beta: float, renormalize: bool, count: bool, shared_experts,
                shared_experts_input: torch.Tensor | None, **kernel_args) -> torch.Tensor:
    """The layer's routed output [T, H] (see the module docstring)."""
    token, slot, weights = _routed_pairs(topk_weights, skip_beta, renormalize, count)
    experts = topk_ids[token, slot].long()
    group = bases.group_of_expert[experts]
    order = torch.argsort(group, stable=True)  # rows of one group contiguous
    token, slot, experts, group = token[order], slot[order], experts[order], group[order]
    position, width = _padded_slots(group, bases.groups)
    groups, rank, hidden = bases.input_basis.shape
    dtype = bases.input_basis.dtype
    # A_g x for every row: the rows scattered into a zero-padded [G, n, H] batch, one batched GEMM
    batch = hidden_states.new_zeros((groups, width, hidden), dtype=dtype)
    batch[group, position] = hidden_states[token].to(dtype)
    latent = torch.bmm(batch, bases.input_basis.transpose(1, 2))[group, position]
    if shared_experts is not None and shared_experts_input is None:
        shared_experts_input = hidden_states
    rows = moe_kernel.apply(hidden_states=latent.to(hidden_states.dtype).contiguous(),
                            topk_weights=weights[token, slot].unsqueeze(1).contiguous(),
                            topk_ids=bases.bank_of_expert[experts].to(topk_ids.dtype).unsqueeze(1).contiguous(),
                            shared_experts=shared_experts, shared_experts_input=shared_experts_input,
                            **kernel_args)
    # B_g of every row's (weighted) output, batched the same way, then summed per token in float32
    batch_out = rows.new_zeros((groups, width, rank), dtype=dtype)
    batch_out[group, position] = rows.to(dtype)
    back = torch.bmm(batch_out, bases.output_basis)[group, position]
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token, back.float())
    return out.to(hidden_states.dtype)
