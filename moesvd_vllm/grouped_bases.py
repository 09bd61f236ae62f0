"""Group-wise bases (format version 4, `basis_groups` G > 1) inside vLLM's fused MoE: each routed
(token, expert) pair runs in the rank space of its expert's group.

Expert e of group g computes B_g down_k(act(gate_k(A_g x)) * up_k(A_g x)) (App. D.4's group-wise V-sharing;
G = E gives every expert its own bases). Every routed (token, expert) pair becomes one row: its token's
hidden state times its group's A_g (`rowwise_group_matmul`: on CPU one GEMM per group some row visits,
so a token reads only its k experts' bases; on accelerators one batched GEMM padded to the largest
group), then all rows form one top-1 problem for vLLM's own fused-experts kernel in the r-dimensional
space, each row with its bank id (the layout dynamic skipping uses, moesvd_vllm/skip_kernel.py: the CPU
kernel has no expert map), and the kernel's weighted [P, r] outputs go back through their group's B_g and
are summed per token in float32. On CPU vLLM calls the MoE method inside the compiled graph (no opaque
`moe_forward` op there), so the grouped GEMM with its data-dependent work is a custom op that
torch.compile sees only by its output shape.

The stacked bases are plain parameters (checkpoint names `moe_svd_in.weight` [G r, H] and
`moe_svd_out.weight` [H, G r]) read in slices, not vLLM linear layers: a CPU linear layer may repack its
weight, and one GEMM over all G stacked groups would cost G r H per token. B is rearranged once at load
into B_g [G, H, r].
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
        self.output_size, self.input_size = shape  # as on a vLLM linear layer (the stacked, logical shape)

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
    output_basis: torch.Tensor  # [G, H, r]: B_g
    group_of_expert: torch.Tensor  # [E] int64
    bank_of_expert: torch.Tensor  # [E] int64

    @property
    def groups(self) -> int:
        return self.input_basis.shape[0]


def per_group_views(input_weight: torch.Tensor, output_weight: torch.Tensor, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored [G r, H] and [H, G r] bases as A_g [G, r, H] (a view) and B_g [G, H, r] (a copy, made
    once at load: the checkpoint keeps B's stacked layout). Both are row-major per group, so their
    transposes are the layout `rowwise_group_matmul` runs fastest."""
    hidden = input_weight.shape[1]
    rank = input_weight.shape[0] // groups
    return (input_weight.view(groups, rank, hidden),
            output_weight.view(hidden, groups, rank).permute(1, 0, 2).contiguous())


def _routed_pairs(topk_weights: torch.Tensor, skip_beta: float, renormalize: bool, count: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot, weights) of the pairs that reach the kernel: all of them, or the ones dynamic skipping
    keeps (moesvd_vllm/skipping.py) with their renormalised weights."""
    if skip_beta <= 0.0:  # every pair, in token order (static shapes: nothing data-dependent to trace)
        num_tokens, k = topk_weights.shape
        token = torch.arange(num_tokens, device=topk_weights.device).repeat_interleave(k)
        slot = torch.arange(k, device=topk_weights.device).repeat(num_tokens)
        return token, slot, topk_weights
    keep = keep_mask(topk_weights, skip_beta)
    weights = kept_weights(topk_weights, keep, renormalize).to(topk_weights.dtype)
    token, slot = keep.nonzero(as_tuple=True)
    if count:
        PairCounter.get().add(topk_weights.numel(), topk_weights.numel() - token.numel())
    return token, slot, weights


# On a CPU without native bf16 GEMMs (AVX2: torch's fallback runs at about 5.5 GFLOP/s), a group with this
# many rows or more is faster converted to float32 once (one pass over r H weights, then an MKL GEMM at
# about 45 GFLOP/s); a lone row stays a bf16 GEMV, which reads each weight once (docs/performance.md).
_FLOAT32_FROM_ROWS = 2


def _native_gemm(weights: torch.Tensor) -> bool:
    """Whether torch multiplies `weights`' dtype natively here (oneDNN's bf16 / fp16 GEMMs need AMX or
    AVX512-BF16 / AVX512-FP16; without them torch falls back to a slow reference GEMM)."""
    probes = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if weights.device.type != "cpu" or weights.dtype not in probes:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probes[weights.dtype])())
    except (AttributeError, RuntimeError):  # a torch without the probe
        return False


def _padded_batched_matmul(rows: torch.Tensor, group: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Accelerators: the rows scattered into a zero-padded [G, n, D_in] batch (n: the largest group's row
    count) for one batched GEMM; it reads every group's weights and pads every group to n rows."""
    out = rows.new_empty((rows.shape[0], weights.shape[2]))
    counts = torch.bincount(group, minlength=weights.shape[0])
    order = torch.argsort(group, stable=True)
    sorted_group = group[order]
    position = torch.arange(group.shape[0], device=group.device) - (torch.cumsum(counts, 0) - counts)[sorted_group]
    batch = rows.new_zeros((weights.shape[0], int(counts.max()), rows.shape[1]))
    batch[sorted_group, position] = rows[order]
    out[order] = torch.bmm(batch, weights)[sorted_group, position]
    return out


def _per_group_matmul(rows: torch.Tensor, group: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CPUs: the rows sorted by group, one GEMM per visited group on its slice (groups no row visits
    cost nothing: one token of a 128-expert layer reads 8 experts' bases, not 128)."""
    counts = torch.bincount(group, minlength=weights.shape[0])
    order = torch.argsort(group, stable=True)
    sorted_rows = rows[order]
    sorted_out = rows.new_empty((rows.shape[0], weights.shape[2]))
    convert = not _native_gemm(weights)
    visited = counts.nonzero().flatten()
    start = 0
    for g, n in zip(visited.tolist(), counts[visited].tolist()):
        end = start + n
        if convert and n >= _FLOAT32_FROM_ROWS:
            sorted_out[start:end] = sorted_rows[start:end].float() @ weights[g].float()
        else:
            torch.mm(sorted_rows[start:end], weights[g], out=sorted_out[start:end])
        start = end
    out = torch.empty_like(sorted_out)
    out[order] = sorted_out
    return out


@torch.library.custom_op("moesvd::rowwise_group_matmul", mutates_args=())
def rowwise_group_matmul(rows: torch.Tensor, group: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows[p] @ weights[group[p]] for every row p: [P, D_in] x [G, D_in, D_out] -> [P, D_out].

    `weights` should be a transposed view of row-major [G, D_out, D_in] matrices: every output element is
    then a contiguous dot product, the layout torch's bf16 fallback on AVX2 runs fastest (the other one is
    about 20x slower there). A custom op: on CPU vLLM calls the MoE method inside the compiled graph, and
    the work per group is data-dependent, so torch.compile sees only the op's shape (the fake below)."""
    if group.numel() == 0:
        return rows.new_empty((rows.shape[0], weights.shape[2]))
    if rows.device.type == "cpu":
        return _per_group_matmul(rows, group, weights)
    return _padded_batched_matmul(rows, group, weights)


@rowwise_group_matmul.register_fake
def _(rows: torch.Tensor, group: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weights.shape[2]))


def run_grouped(moe_kernel, bases: GroupedBases, *, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, skip_beta: float, renormalize: bool, count: bool, shared_experts,
                shared_experts_input: torch.Tensor | None, **kernel_args) -> torch.Tensor:
    """The layer's routed output [T, H] (see the module docstring)."""
    token, slot, weights = _routed_pairs(topk_weights, skip_beta, renormalize, count)
    experts = topk_ids[token, slot].long()
    group = bases.group_of_expert[experts]
    dtype = bases.input_basis.dtype
    # A_g x for every row (rowwise_group_matmul: one GEMM per visited group)
    latent = rowwise_group_matmul(hidden_states[token].to(dtype), group, bases.input_basis.transpose(1, 2))
    if shared_experts is not None and shared_experts_input is None:
        shared_experts_input = hidden_states
    rows = moe_kernel.apply(hidden_states=latent.to(hidden_states.dtype),
                            topk_weights=weights[token, slot].unsqueeze(1).contiguous(),
                            topk_ids=bases.bank_of_expert[experts].to(topk_ids.dtype).unsqueeze(1).contiguous(),
                            shared_experts=shared_experts, shared_experts_input=shared_experts_input,
                            **kernel_args)
    # B_g of every row's (weighted) output, then summed per token in float32
    back = rowwise_group_matmul(rows.to(dtype), group, bases.output_basis.transpose(1, 2))
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token, back.float())
    return out.to(hidden_states.dtype)
