"""The low-rank shared-basis MoE block that replaces a decomposed MoE layer inside vLLM.

A decomposed layer (schema form "shared_basis", see moesvd_vllm/format/schema.py) computes, for a token x,

    y = sum over the top-k experts e of  w_e * B @ down_k(act(gate_k(A x)) * up_k(A x)),  k = bank_map[e]

with the routing (w, e) computed from the full hidden state x exactly as the original architecture does.
That is vLLM's "latent MoE" (model_executor/models/nemotron_h.py): the input basis A is the routed input
transform, vLLM's fused MoE kernels run the per-bank factors in the r-dimensional space, and the output basis
B is the routed output transform. Banks (several experts sharing one factor set, as U-trimming writes them)
are a routing remap: route over the E original experts, then map expert ids to bank ids with a lookup table,
so the fused kernel holds K <= E banks.

Tensor-parallel layout: A, B and the router are replicated on every rank; the fused-MoE loader shards the
factors along the expert intermediate dimension (gate/up rows, down columns), never along the rank r. The
routed output is reduced across ranks before or after B (B is linear and bias-free, so either is exact).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.utils import sequence_parallel_chunk

from moesvd_vllm.format.schema import CONFIG_KEY, LayerSpec, MoESVDConfig, SchemaError

logger = logging.getLogger("vllm.moesvd_vllm.layers")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Parameter names of the two shared bases on the MoE block (the checkpoint names of the schema).
INPUT_BASIS = "moe_svd_in"
OUTPUT_BASIS = "moe_svd_out"


class CompressionConfigError(ValueError):
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


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


class BasisProjection(ReplicatedLinear):
    """One shared basis (A: H -> r, or B: r -> H), replicated on every rank, kept in its stored dtype.

    Bases may be stored in float32 while the model runs in bfloat16 (faster on CPUs without native bf16
    matmul, and more accurate): the input is cast to the basis dtype and the result back to the input dtype.
    """

    def __init__(self, input_size: int, output_size: int, basis_dtype: torch.dtype, prefix: str):
        super().__init__(input_size, output_size, bias=False, params_dtype=basis_dtype, quant_config=None,
                         prefix=prefix, return_bias=False)
        self.basis_dtype = basis_dtype
        # Bias-free and unquantized: the tensor-parallel sum commutes with it (sum_r B z_r = B sum_r z_r),
        # so vLLM may reduce the routed output after the output basis.
        self.reduce_commutative = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.basis_dtype)).to(x.dtype)


class BankRouting(nn.Module):
    """Original routing over E experts, then expert id -> bank id through a lookup table.

    Passed to vLLM's fused MoE as `custom_routing_function`: plain tensor ops (softmax, top-k, an index), so
    torch.compile traces through it. The weights follow the original architecture: softmax over all E
    logits, top-k, and renormalisation over the k chosen when `renormalize` (Qwen3-MoE `norm_topk_prob`,
    Mixtral always). Two chosen experts may share a bank; each still contributes with its own weight.
    """

    def __init__(self, bank_map: Sequence[int]):
        super().__init__()
        self.register_buffer("bank_of_expert", torch.tensor(list(bank_map), dtype=torch.int32),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(gating_output.float(), dim=-1)
        weights, experts = torch.topk(probabilities, k=topk, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        banks = self.bank_of_expert[experts.long()]
        return weights.to(torch.float32), banks.to(torch.int32)


def is_identity(bank_map: Sequence[int]) -> bool:
    return list(bank_map) == list(range(len(bank_map)))


class LowRankSharedBasisMoE(nn.Module):
    """A decomposed MoE layer: router on x, input basis A, fused MoE over K banks in rank space, basis B.

    Checkpoint names under this block (`prefix`): `gate.weight` [E, H] (router, unchanged),
    `moe_svd_in.weight` [r, H], `moe_svd_out.weight` [H, r] (absent when `spec.bases` is false),
    `experts.k.<gate>.weight` [I', r], `experts.k.<up>.weight` [I', r], `experts.k.<down>.weight` [r, I']
    for banks k < K, with I' = `intermediate_size` (the kept neurons).
    """

    def __init__(self, *, vllm_config, spec: LayerSpec, hidden_size: int, intermediate_size: int,
                 top_k: int, renormalize: bool, expert_names: tuple[str, str, str], prefix: str,
                 shared_experts: nn.Module | None = None, activation: str = "silu"):
        super().__init__()
        parallel_config = vllm_config.parallel_config
        if parallel_config.enable_eplb:
            raise CompressionConfigError(
                f"{prefix}: expert-parallel load balancing (--enable-eplb) is not supported for "
                "MoE-SVD compressed layers; start the server without it")
        self.hidden_size = hidden_size
        self.rank = spec.rank
        self.num_experts = spec.num_experts
        self.num_banks = spec.num_banks
        self.is_sequence_parallel = parallel_config.use_sequence_parallel_moe
        basis_dtype = torch_dtype(spec.basis_dtype)

        self.gate = GateLinear(hidden_size, spec.num_experts, quant_config=None, prefix=f"{prefix}.gate")
        self.shared_experts = shared_experts
        # Bases before experts: the runner holds the same modules, and this order keeps their parameter
        # names `<prefix>.moe_svd_in.weight` / `<prefix>.moe_svd_out.weight`. A layer reduced only in its
        # intermediate size (`bases: false`, r = H) has none: the experts run on x itself.
        self.moe_svd_in = self.moe_svd_out = None
        if spec.bases:
            self.moe_svd_in = BasisProjection(hidden_size, spec.rank, basis_dtype, f"{prefix}.{INPUT_BASIS}")
            self.moe_svd_out = BasisProjection(spec.rank, hidden_size, basis_dtype,
                                               f"{prefix}.{OUTPUT_BASIS}")
        self.bank_routing = None if is_identity(spec.bank_map) else BankRouting(spec.bank_map)
        gate_name, up_name, down_name = expert_names
        self.experts = FusedMoEFactory(
            num_experts=spec.num_banks,
            top_k=top_k,
            hidden_size=spec.rank,
            intermediate_size=intermediate_size,
            renormalize=renormalize,
            quant_config=None,
            prefix=f"{prefix}.experts",
            custom_routing_function=self.bank_routing,
            activation=activation,
            ckpt_names=(gate_name, down_name, up_name),
            is_sequence_parallel=self.is_sequence_parallel,
            shared_experts=shared_experts,
            routed_input_transform=self.moe_svd_in,
            routed_output_transform=self.moe_svd_out,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        original_shape = hidden_states.shape
        num_tokens = hidden_states.shape[0] if hidden_states.dim() > 1 else 1
        hidden_states = hidden_states.view(-1, self.hidden_size)
        if self.is_sequence_parallel:
            hidden_states = sequence_parallel_chunk(hidden_states)
        # Route on the full hidden state x; never hand `gate` to the runner, which would route on A x.
        router_logits, _ = self.gate(hidden_states)
        output = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        if self.is_sequence_parallel:
            output = tensor_model_parallel_all_gather(output, 0)[:num_tokens]
        return output.view(original_shape)

