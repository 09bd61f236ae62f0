"""The routed experts of a decomposed MoE layer, as a vLLM fused-MoE method (`FusedMoEMethodBase`).

A decomposed layer (schema form "shared_basis", moesvd_vllm/format/schema.py) computes, for a token x routed
to experts e_1..e_k with weights w_1..w_k by the architecture's own router,

    y = sum_j w_j * B @ down_k(act(gate_k(A x)) * up_k(A x)),   k = bank_map[e_j]

(the paper's Eq. 6-7 with a shared input basis A [r, H] and output basis B [H, r]; K <= E banks of
factors after U-trimming). vLLM's MoE runner keeps everything outside the routed experts: the router
(softmax, sigmoid with grouped top-k and a score-correction bias, sparsemixer...), the routed scaling
factor, the shared experts and the tensor-parallel reduction. It hands this method the routing result
(`topk_weights`, `topk_ids` over the E original experts); the method maps expert ids to bank ids, runs A,
vLLM's own fused-experts kernel for the unquantized method (on CPU `cpu_fused_moe`) over the K banks in
the r-dimensional space, and B. Layers stored without bases (`bases: false`, r = H) skip A and B.

Tensor / expert parallelism: A and B are replicated; the factors are sharded along the kept intermediate
dimension I' (gate/up rows, down columns) over the ranks of the MoE layer, never along r. Each rank returns
a partial sum; vLLM reduces it after this method (B is linear, so reducing after B is exact).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import ReplicatedLinear

from moesvd_vllm.architectures import MoEDims, moe_layout
from moesvd_vllm.format.safetensors_io import torch_dtype
from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.schema import CONFIG_KEY, LayerSpec, MoESVDConfig, SchemaError
from moesvd_vllm.grouped_bases import GroupedBases, StackedBasis, per_group_views, run_grouped
from moesvd_vllm.skip_kernel import run_skipping

logger = logging.getLogger("vllm.moesvd_vllm.layers")


# Parameter names of the two shared bases (also their names in the checkpoint, under the MoE block).
INPUT_BASIS = "moe_svd_in"
OUTPUT_BASIS = "moe_svd_out"


class CompressionConfigError(MoESVDError):
    """The compressed checkpoint cannot be served by this plugin; the message says why and what to do."""


def compression_config(hf_config) -> MoESVDConfig:
    """The validated `moe_svd` block of a plugin architecture's config (raises if absent or invalid)."""
    block = getattr(hf_config, CONFIG_KEY, None)
    if block is None:
        raise CompressionConfigError(
            f"config.json names a moesvd plugin architecture {getattr(hf_config, 'architectures', None)} "
            f"but has no `{CONFIG_KEY}` block. A dense checkpoint must keep its original architecture "
            "name; a compressed one must be written by `moesvd compress`.")
    try:
        config = MoESVDConfig.from_dict(block)
    except SchemaError as error:
        raise CompressionConfigError(f"invalid compressed checkpoint: {error}") from None
    for key, spec in config.layers.items():
        if spec.form != "shared_basis":
            raise CompressionConfigError(
                f"decoder layer {key}: form {spec.form!r} cannot be served by vLLM (only 'shared_basis'; "
                "the per-expert form is a baseline for the PyTorch reference, offline.reference). "
                "Re-compress with the shared-basis method to serve it.")
    return config


def serving_betas(hf_config, compression: MoESVDConfig) -> dict[int, float]:
    """beta per MoE layer to skip with (layers without skipping left out): the checkpoint's `moe_svd.skipping`
    betas, overridden by MOESVD_SKIP_BETA at server start (moesvd_vllm/skipping.py); a bad value raises."""
    from moesvd_vllm.architectures import moe_layer_indices
    from moesvd_vllm.skipping import BETA_ENV, SkippingError, resolve_betas

    moe_layers = moe_layer_indices(hf_config.to_dict())
    stored = None
    try:
        if compression.skipping is not None:
            compression.skipping.validate_layers(moe_layers, f"{CONFIG_KEY}.skipping")
            stored = compression.skipping.betas
        return resolve_betas(stored, moe_layers)
    except (SchemaError, SkippingError) as error:
        raise CompressionConfigError(f"expert skipping: {error} (server-start override: {BETA_ENV})") from None


def _factor_shards(parallel: FusedMoEParallelConfig) -> tuple[int, int]:
    """(rank, count) of the split of every bank's intermediate neurons over this MoE layer's ranks.

    Tensor parallelism splits them over the TP group. Expert parallelism (without data parallelism) puts
    the same ranks in the EP group; banks are few and shared by several experts, so the plugin splits
    every bank's neurons over the EP group instead of placing whole banks: the output is a partial sum
    either way, and vLLM all-reduces it over the same group.
    """
    if parallel.use_ep:
        return parallel.ep_rank, parallel.ep_size
    return parallel.tp_rank, parallel.tp_size


class SharedBasisExperts(FusedMoEMethodBase):
    """`FusedMoEMethodBase` of one decomposed layer: A, the fused kernel over K banks, B.

    Parameters it creates on vLLM's `RoutedExperts` layer (names under `...experts.routed_experts.`):
    `w13_weight` [K, 2 I'/n, r] and `w2_weight` [K, r, I'/n] (n ranks; vLLM's own unquantized fused-MoE
    method creates, prepacks and runs them, configured for K experts of hidden size r), and, with bases,
    the modules `moe_svd_in` (weight [r, H]) and `moe_svd_out` (weight [H, r]), vLLM ReplicatedLinear
    layers in the wider of the model and the stored basis dtype.
    """

    def __init__(self, moe: FusedMoEConfig, spec: LayerSpec, dims: MoEDims, model_type: str,
                 layer_index: int, skip_beta: float = 0.0):
        super().__init__(moe)
        parallel = moe.moe_parallel_config
        where = f"decoder layer {layer_index} ({CONFIG_KEY}.layers.{layer_index})"
        if parallel.enable_eplb:
            raise CompressionConfigError(
                f"{where}: expert-parallel load balancing (--enable-eplb) cannot move MoE-SVD banks; "
                "start the server without it")
        if parallel.dp_size > 1 or parallel.pcp_size > 1:
            raise CompressionConfigError(
                f"{where}: data / context parallelism across the MoE layer is not supported for "
                "MoE-SVD compressed layers; use --tensor-parallel-size (with or without "
                "--enable-expert-parallel)")
        self.spec = spec
        self.layer_index = layer_index
        self.rank = spec.rank
        self.hidden_size = dims.hidden
        self.kept_intermediate = spec.kept_intermediate(dims)
        self.shard_rank, self.num_shards = _factor_shards(parallel)
        if self.kept_intermediate % self.num_shards:
            raise CompressionConfigError(
                f"{where}: {self.kept_intermediate} kept intermediate neurons per bank do not split over "
                f"{self.num_shards} ranks; serve with a parallel size that divides it")
        self.local_intermediate = self.kept_intermediate // self.num_shards
        self.basis_dtype = torch_dtype(spec.basis_dtype)
        # The K banks seen as an ordinary MoE layer of K experts with hidden size r and intermediate I',
        # sharded n ways like a tensor-parallel layer (see _factor_shards).
        bank_parallel = dataclasses.replace(parallel, tp_size=self.num_shards, tp_rank=self.shard_rank,
                                            ep_size=1, ep_rank=0, use_ep=False)
        self.bank_moe = dataclasses.replace(
            moe, num_experts=spec.num_banks, num_local_experts=spec.num_banks,
            num_logical_experts=spec.num_banks, hidden_dim=spec.rank, hidden_dim_unpadded=None,
            intermediate_size=self.kept_intermediate, intermediate_size_per_partition_unpadded=None,
            intermediate_pad=None, moe_parallel_config=bank_parallel)
        self.bank_method = UnquantizedFusedMoEMethod(self.bank_moe)
        layout = moe_layout(model_type)
        block = f"model.layers.{layer_index}.{layout.moe_module}"
        self.checkpoint_names = {INPUT_BASIS: f"{block}.{INPUT_BASIS}.weight",
                                 OUTPUT_BASIS: f"{block}.{OUTPUT_BASIS}.weight"}
        self.factor_names = {"w1": layout.gate_proj, "w3": layout.up_proj, "w2": layout.down_proj}
        self.block_prefix = block
        self.remap = list(spec.bank_map) != list(range(spec.num_experts))
        self.has_bases = spec.bases
        self.groups = spec.basis_groups  # G > 1: group-wise bases, stacked (moesvd_vllm/grouped_bases.py)
        self.skip_beta = skip_beta  # dynamic expert skipping (moesvd_vllm/skipping.py); 0: off

    # ------------------------------------------------------------------------------------- weights

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype,
                            moe_parallel_config):
        # The layer's own sizes (H, I) stay as they are: vLLM's runner pads the activations to them.
        return hidden_size, intermediate_size_per_partition

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        rank, local = self.bank_method.maybe_roundup_sizes(
            self.rank, self.local_intermediate, self.bank_moe.in_dtype, self.bank_moe.moe_parallel_config)
        if rank != self.rank:
            raise CompressionConfigError(
                f"decoder layer {self.layer_index}: this vLLM fused-MoE backend needs the rank padded from "
                f"{self.rank} to {rank}; re-compress with a rank multiple of {rank}")
        # What vLLM's RoutedExperts does for its own config, here for the banks' config.
        self.bank_moe.hidden_dim = rank
        self.bank_moe.intermediate_size_per_partition = local
        attrs = dict(extra_weight_attrs, weight_loader=self._load_factor, global_num_experts=self.spec.num_banks,
                     unpadded_hidden_size=rank)
        self.bank_method.create_weights(layer, self.spec.num_banks, rank, local, params_dtype, **attrs)
        layer.w13_weight.data.zero_()  # padding beyond the loaded neurons must be zero
        layer.w2_weight.data.zero_()
        bank_of_expert = torch.tensor(self.spec.bank_map, dtype=torch.int64)
        layer.register_buffer("moe_svd_bank_of_expert", bank_of_expert, persistent=False)
        if self.has_bases:
            # Each basis is computed in the wider of the activation and the stored dtype, so a bf16
            # checkpoint served in float32 is not rounded to bf16 at the bases (and float32 bases of a bf16
            # model keep their precision); the dtype is fixed here, once. vLLM's ReplicatedLinear: the same
            # matrix on every rank, run by vLLM's own GEMM dispatch (prepacked on CPU).
            self.compute_dtype = torch.promote_types(params_dtype, self.basis_dtype)
            stacked = self.groups * self.rank
            for name, (size_in, size_out) in ((INPUT_BASIS, (self.hidden_size, stacked)),
                                              (OUTPUT_BASIS, (stacked, self.hidden_size))):
                if self.groups > 1:  # read in group slices (moesvd_vllm/grouped_bases.py)
                    basis = StackedBasis((size_out, size_in), self.compute_dtype, self.checkpoint_names[name])
                else:
                    basis = ReplicatedLinear(size_in, size_out, bias=False, params_dtype=self.compute_dtype,
                                             quant_config=None, prefix=f"{layer.layer_name}.{name}",
                                             return_bias=False)
                layer.add_module(name, basis)
        if self.groups > 1:
            group_of_expert = torch.tensor([self.spec.group_of_expert(e) for e in range(self.spec.num_experts)],
                                           dtype=torch.int64)
            layer.register_buffer("moe_svd_group_of_expert", group_of_expert, persistent=False)

    def _load_factor(self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str,
                     expert_id: int, return_success: bool = False) -> bool | None:
        """Load bank `expert_id`'s gate (w1), up (w3) or down (w2) factor, this rank's neurons only.

        vLLM's expert loaders call this with the checkpoint tensor of `experts.<k>.<projection>`; the bank
        index k plays the expert index (banks are experts 0..K-1 of this layer's fused MoE).
        """
        name = f"{self.block_prefix}.experts.{expert_id}.{self.factor_names.get(shard_id, shard_id)}.weight"
        if not 0 <= expert_id < self.spec.num_banks:
            raise CompressionConfigError(
                f"decoder layer {self.layer_index}, tensor {name}: bank {expert_id} does not exist (the "
                f"layer has {self.spec.num_banks} bank(s)); dense or stale expert tensors left in a "
                "compressed layer? Re-create the checkpoint with `moesvd compress`.")
        gate_or_up = shard_id in ("w1", "w3")
        expected = (self.kept_intermediate, self.rank) if gate_or_up else (self.rank, self.kept_intermediate)
        if tuple(loaded_weight.shape) != expected:
            raise CompressionConfigError(
                f"decoder layer {self.layer_index}, tensor {name}: shape {list(loaded_weight.shape)}, "
                f"expected {list(expected)} (rank {self.rank}, {self.kept_intermediate} kept neurons)")
        start, size = self.shard_rank * self.local_intermediate, self.local_intermediate
        bank = param.data[expert_id]
        if gate_or_up:
            half = bank.shape[0] // 2  # [gate; up], each padded to the kernel's intermediate size
            offset = 0 if shard_id == "w1" else half
            bank[offset:offset + size].copy_(loaded_weight[start:start + size])
        else:
            bank[:, :size].copy_(loaded_weight[:, start:start + size])
        return True if return_success else None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # vLLM's unquantized method prepacks the factors for its kernel and builds the kernel. It reads the
        # expert geometry from `layer.moe_config`: show it the banks' config while it does.
        layer_config = layer.moe_config
        layer.moe_config = self.bank_moe
        try:
            self.bank_method.process_weights_after_loading(layer)
        finally:
            layer.moe_config = layer_config
        self.moe_kernel = self.bank_method.moe_kernel
        if self.groups > 1:  # A_g [G, r, H] and B_g [G, H, r] for the per-group GEMMs (moesvd_vllm/grouped_bases.py)
            self.group_in, self.group_out = per_group_views(layer.moe_svd_in.weight.data,
                                                            layer.moe_svd_out.weight.data, self.groups)
            layer.moe_svd_out.weight.data = self.group_out  # the stacked copy is not kept
        self.moe_quant_config = self.bank_method.moe_quant_config
        if self.moe_kernel.is_monolithic:  # routes by itself from router logits: no place for the bank map
            raise CompressionConfigError(
                f"decoder layer {self.layer_index}: vLLM picked a monolithic fused-MoE kernel "
                f"({type(self.moe_kernel.fused_experts).__name__}) that routes internally; MoE-SVD layers "
                "need a modular one (choose another backend with --moe-backend)")

    def get_fused_moe_quant_config(self, layer: nn.Module):
        return self.bank_method.get_fused_moe_quant_config(layer)

    @property
    def supports_eplb(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------- forward

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts, shared_experts_input: torch.Tensor | None) -> torch.Tensor:
        if self.groups > 1:
            return self._apply_grouped(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        latent = x
        if self.has_bases:
            latent = layer.moe_svd_in(x.to(self.compute_dtype)).to(x.dtype)
        if self.remap:  # expert ids -> bank ids (U-trimming); a tensor index, traceable by torch.compile
            topk_ids = layer.moe_svd_bank_of_expert[topk_ids.long()].to(topk_ids.dtype)
        kernel_args = dict(w1=layer.w13_weight, w2=layer.w2_weight, activation=layer.activation,
                           global_num_experts=self.spec.num_banks, expert_map=None,
                           apply_router_weight_on_input=layer.apply_router_weight_on_input)
        if self.skip_beta > 0.0:  # only the kept pairs reach the kernel (moesvd_vllm/skip_kernel.py)
            out = run_skipping(self.moe_kernel, hidden_states=latent, topk_weights=topk_weights,
                               topk_ids=topk_ids, beta=self.skip_beta, renormalize=layer.renormalize,
                               count=self.shard_rank == 0, shared_experts=shared_experts,
                               shared_experts_input=shared_experts_input, **kernel_args)
        else:
            out = self.moe_kernel.apply(hidden_states=latent, topk_weights=topk_weights, topk_ids=topk_ids,
                                        shared_experts=shared_experts, shared_experts_input=shared_experts_input,
                                        **kernel_args)
        if self.has_bases:
            out = layer.moe_svd_out(out.to(self.compute_dtype)).to(x.dtype)
        return out

    def _apply_grouped(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, shared_experts, shared_experts_input: torch.Tensor | None
                       ) -> torch.Tensor:
        """Group-wise bases: every routed pair in its group's rank space (moesvd_vllm/grouped_bases.py)."""
        bases = GroupedBases(self.group_in, self.group_out, layer.moe_svd_group_of_expert,
                             layer.moe_svd_bank_of_expert)
        return run_grouped(self.moe_kernel, bases, hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids,
                           skip_beta=self.skip_beta, renormalize=layer.renormalize, count=self.shard_rank == 0,
                           shared_experts=shared_experts, shared_experts_input=shared_experts_input,
                           w1=layer.w13_weight, w2=layer.w2_weight, activation=layer.activation,
                           global_num_experts=self.spec.num_banks, expert_map=None,
                           apply_router_weight_on_input=layer.apply_router_weight_on_input)
