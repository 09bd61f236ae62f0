"""PyTorch reference for every checkpoint this project reads: the ground truth of the compressed math.

`load_reference_model(model_dir)` returns a transformers causal LM:

* dense checkpoint (no `moe_svd` block): plain `AutoModelForCausalLM.from_pretrained`;
* compressed checkpoint: the ORIGINAL architecture is built from config.json (`moe_svd` removed,
  `architectures` set back to `moe_svd.original_architectures`), and in each decomposed layer the MoE
  block's `experts` module is replaced by `SharedBasisExperts`, `PerExpertLowRankExperts` or
  (form "shared_core") `offline.shared_core.SharedCoreExperts`.

Only `experts` is replaced, so routing is the original block's own code: its router (softmax / sigmoid /
sparsemixer, top-k, renormalisation rules), shared experts (qwen2_moe, deepseek_v2) and output scaling
all stay as transformers implements them, and every routing decision uses the full hidden state x.
A transformers 5 MoE block calls `experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`;
the replacements keep that signature. Expert e of a shared_basis layer computes

    B @ down_k( act(gate_k(A x)) * up_k(A x) ),  k = bank_map[e],  A = moe_svd_in [r, H],  B = moe_svd_out [H, r]

and the routing-weighted sum over the selected experts is taken in the rank space before B is applied
(B is linear, so this equals applying B per expert). A per_expert layer computes
W_e x ~= lora_b (lora_a x) for each of gate, up and down.

Every decomposed layer's tensors are checked first, from the safetensors headers, by the validator the
plugin loads with (`moesvd_vllm.format.validator`); a missing, unexpected, wrongly shaped or typed tensor
fails with an error naming the layer and the tensor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moesvd_vllm.architectures import (
    MoEDims,
    module_moe_block,
    module_name,
    moe_dims,
    moe_layer_indices,
    moe_layout,
)
from moesvd_vllm.errors import CheckpointError
from moesvd_vllm.format.safetensors_io import torch_dtype
from moesvd_vllm.format.directories import read_config
from moesvd_vllm.format.schema import (
    CONFIG_KEY,
    LayerSpec,
    MoESVDConfig,
    SchemaError,
    expected_layer_tensors,
    read_moe_svd_config,
)
from moesvd_vllm.format.validator import validate_checkpoint_files
from offline.expert_tensors import CheckpointTensors, moe_prefix, read_layer_experts

logger = logging.getLogger(__name__)

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]



def combine_selected_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor, num_experts: int, out_features: int,
                             expert_fn: ExpertFn) -> torch.Tensor:
    """sum_j top_k_weights[t, j] * expert_fn(top_k_index[t, j], x_t) for every token t.

    Same dispatch as transformers' eager experts: ids >= num_experts (padding) are skipped, outputs are
    weighted in the expert's dtype and accumulated in the input's dtype.
    """
    output = hidden_states.new_zeros(hidden_states.shape[0], out_features)
    for expert in torch.unique(top_k_index).tolist():
        if expert >= num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == expert)
        expert_out = expert_fn(expert, hidden_states[token_idx])
        expert_out = expert_out * top_k_weights[token_idx, slot, None]
        output.index_add_(0, token_idx, expert_out.to(output.dtype))
    return output


def _frozen(tensor: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=False)


class SharedBasisExperts(nn.Module):
    """Routed experts sharing an input basis A and an output basis B, with K banks of factors."""

    def __init__(self, input_basis: torch.Tensor, output_basis: torch.Tensor, gate: torch.Tensor,
                 up: torch.Tensor, down: torch.Tensor, bank_map: list[int],
                 act_fn: Callable[[torch.Tensor], torch.Tensor], *, dtype: torch.dtype,
                 basis_dtype: torch.dtype):
        super().__init__()
        self.input_basis = _frozen(input_basis, basis_dtype)  # A [G r, H] (G = 1 but for group-wise bases)
        self.output_basis = _frozen(output_basis, basis_dtype)  # B [H, G r]
        self.gate = _frozen(gate, dtype)  # [K, I, r]
        self.up = _frozen(up, dtype)  # [K, I, r]
        self.down = _frozen(down, dtype)  # [K, r, I]
        self.register_buffer("bank_map", torch.tensor(bank_map, dtype=torch.long), persistent=False)
        self.num_experts = len(bank_map)
        self.rank = self.gate.shape[-1]
        self.groups = self.input_basis.shape[0] // self.rank  # G groups of bases, stacked (schema, version 4)
        self.group_size = self.num_experts // self.groups
        self.act_fn = act_fn

    def _bank_expert(self, expert: int, latent: torch.Tensor) -> torch.Tensor:
        bank = int(self.bank_map[expert])
        hidden = self.act_fn(F.linear(latent, self.gate[bank])) * F.linear(latent, self.up[bank])
        return F.linear(hidden, self.down[bank])

    def _group_slice(self, expert: int) -> slice:
        group = expert // self.group_size
        return slice(group * self.rank, (group + 1) * self.rank)

    def _grouped_expert(self, expert: int, latent: torch.Tensor) -> torch.Tensor:
        """Expert `expert` on the stacked latents [n, G r]: its group's slice in, its group's slot out."""
        where = self._group_slice(expert)
        out = latent.new_zeros(latent.shape[0], self.groups * self.rank)
        out[:, where] = self._bank_expert(expert, latent[:, where])
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # all groups' latents A_g x at once [T, G r]; expert e reads its group's r columns and adds its output
        # to its group's r columns of the rank-space sum, which B = [B_0 ... B_{G-1}] maps back (linear: exact)
        latent = F.linear(hidden_states.to(self.input_basis.dtype), self.input_basis)
        latent = latent.to(self.gate.dtype)
        expert_fn = self._bank_expert if self.groups == 1 else self._grouped_expert
        latent_out = combine_selected_experts(latent, top_k_index, top_k_weights, self.num_experts,
                                              self.groups * self.rank, expert_fn)
        output = F.linear(latent_out.to(self.output_basis.dtype), self.output_basis)
        return output.to(hidden_states.dtype)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The equivalent dense experts: gate/up [E, I, H] = factor @ A_g, down [E, H, I] = B_g @ factor."""
        a, b = self.input_basis.double(), self.output_basis.double()
        gate, up, down = (t.double()[self.bank_map] for t in (self.gate, self.up, self.down))
        rows = [self._group_slice(e) for e in range(self.num_experts)]
        return (torch.stack([gate[e] @ a[rows[e]] for e in range(self.num_experts)]),
                torch.stack([up[e] @ a[rows[e]] for e in range(self.num_experts)]),
                torch.stack([b[:, rows[e]] @ down[e] for e in range(self.num_experts)]))


class PerExpertLowRankExperts(nn.Module):
    """Routed experts whose every projection is W_e ~= lora_b @ lora_a (no sharing)."""

    def __init__(self, factors: dict[str, torch.Tensor], act_fn: Callable[[torch.Tensor], torch.Tensor],
                 *, dtype: torch.dtype):
        super().__init__()
        # gate_a/up_a [E, r, H], gate_b/up_b [E, I, r], down_a [E, r, I], down_b [E, H, r]
        for name in ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"):
            setattr(self, name, _frozen(factors[name], dtype))
        self.num_experts = self.gate_a.shape[0]
        self.hidden_size = self.down_b.shape[1]
        self.act_fn = act_fn

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate = F.linear(F.linear(x, self.gate_a[expert]), self.gate_b[expert])
        up = F.linear(F.linear(x, self.up_a[expert]), self.up_b[expert])
        hidden = self.act_fn(gate) * up
        return F.linear(F.linear(hidden, self.down_a[expert]), self.down_b[expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.gate_a.dtype)
        output = combine_selected_experts(x, top_k_index, top_k_weights, self.num_experts,
                                          self.hidden_size, self._expert)
        return output.to(hidden_states.dtype)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = {name: getattr(self, name).double() for name in ("gate_a", "gate_b", "up_a", "up_b",
                                                             "down_a", "down_b")}
        return d["gate_b"] @ d["gate_a"], d["up_b"] @ d["up_a"], d["down_b"] @ d["down_a"]


# ----------------------------------------------------------------------------------------------------
# Loading


def load_reference_model(model_dir: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                         attn_implementation: str | None = None, skip_beta: str | None = None
                         ) -> PreTrainedModel:
    """Load a dense, shared_basis or per_expert checkpoint as a transformers model in eval mode.

    Expert factors use `dtype`; shared bases use the wider of `dtype` and their stored `basis_dtype`.
    Any tensor missing from or unused by the model is an error (never a silent random init).
    Dynamic expert skipping (offline/skipping.py) uses the checkpoint's `moe_svd.skipping` betas, replaced by
    `skip_beta` when given (the syntax of the server's MOESVD_SKIP_BETA: a number, "off", or JSON).
    """
    from moesvd_vllm.skipping import resolve_betas
    from offline.skipping import install_reference_skipping

    dtype = torch_dtype(dtype)
    block = read_moe_svd_config(model_dir)
    if block is None:
        model = _load_dense(Path(model_dir), dtype, attn_implementation)
    else:
        model = _load_compressed(Path(model_dir), block, dtype, attn_implementation)
    config = read_config(model_dir)
    stored = block.skipping.betas if block is not None and block.skipping is not None else None
    install_reference_skipping(model, resolve_betas(stored, moe_layer_indices(config), skip_beta or ""), config)
    return model


def _experts_implementation(dtype: torch.dtype) -> dict:
    """transformers' fused expert kernels (grouped_mm) take float32/bf16/fp16 only: float64 (a reference
    for rounding errors) runs its eager per-expert loop."""
    return {"experts_implementation": "eager"} if dtype == torch.float64 else {}


def _load_dense(model_dir: Path, dtype: torch.dtype, attn_implementation: str | None) -> PreTrainedModel:
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    kwargs.update(_experts_implementation(dtype))
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True,
                                                       **kwargs)
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys",
                                                             "mismatched_keys")}
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        raise CheckpointError(f"{model_dir}: transformers could not load the dense checkpoint cleanly: "
                              f"{ {k: v[:4] for k, v in problems.items()} }")
    return model.eval()


def original_config(model_dir: str | os.PathLike):
    """The transformers config of the original architecture (moe_svd block removed, architectures reset)."""
    config = read_config(model_dir)
    block = config.pop(CONFIG_KEY, None)
    if block is not None:
        config["architectures"] = list(MoESVDConfig.from_dict(block).original_architectures)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise SchemaError(f"{model_dir}/config.json has no model_type")
    return AutoConfig.for_model(model_type, **config)


def _load_compressed(model_dir: Path, block: MoESVDConfig, dtype: torch.dtype,
                     attn_implementation: str | None) -> PreTrainedModel:
    raw_config = read_config(model_dir)
    model_type = raw_config["model_type"]
    dims = moe_dims(raw_config)
    validate_checkpoint_files(model_dir, raw_config, block)
    tensors = CheckpointTensors(model_dir)

    config = original_config(model_dir)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    kwargs.update(_experts_implementation(dtype))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.eval()

    consumed: set[str] = set()
    for layer_index in moe_layer_indices(raw_config):
        moe_block = _moe_block(model, layer_index)
        spec = block.layer(layer_index)
        if spec is None:  # kept dense: fill transformers' own fused experts
            consumed.update(_load_dense_experts(tensors, model_type, layer_index, dims, moe_block.experts))
            continue
        moe_block.experts, names = build_compressed_experts(tensors, model_type, layer_index, spec, dims,
                                                             moe_block.experts.act_fn, dtype)
        consumed.update(names)
    filled = _parameter_names_of(model, [_moe_block(model, i).experts for i in moe_layer_indices(raw_config)])
    _load_remaining_tensors(model, tensors, model_type, consumed, filled)
    logger.info("reference model for %s: %s, %d decomposed layer(s)", model_dir, block.method,
                len(block.decomposed_layers))
    return model


def _moe_block(model: PreTrainedModel, layer_index: int) -> nn.Module:
    path = module_moe_block(model.config.model_type, layer_index)
    try:
        block = model.get_submodule(path)
    except AttributeError:
        block = None
    if block is None or not hasattr(block, "experts"):
        raise CheckpointError(f"layer {layer_index} of {type(model).__name__} has no MoE block with `experts` "
                              f"at {path}")
    return block


def _stack(tensors: CheckpointTensors, names: list[str]) -> torch.Tensor:
    return torch.stack([tensors.get(name) for name in names])


def build_compressed_experts(tensors: CheckpointTensors, model_type: str, layer_index: int,
                              spec: LayerSpec, dims: MoEDims, act_fn, dtype: torch.dtype):
    layout = moe_layout(model_type)
    prefix = moe_prefix(model_type, layer_index)
    projections = {"gate": layout.gate_proj, "up": layout.up_proj, "down": layout.down_proj}
    if spec.form == "shared_basis":
        if spec.bases:
            input_basis = tensors.get(f"{prefix}.moe_svd_in.weight")
            output_basis = tensors.get(f"{prefix}.moe_svd_out.weight")
        else:  # intermediate-neuron selection only: the experts run on x itself
            input_basis = output_basis = torch.eye(dims.hidden, dtype=torch.float32)
        factors = {
            what: _stack(tensors, [f"{prefix}.experts.{k}.{proj}.weight" for k in range(spec.num_banks)])
            for what, proj in projections.items()}
        basis_dtype = torch.promote_types(torch_dtype(spec.basis_dtype), dtype)
        module = SharedBasisExperts(input_basis, output_basis, factors["gate"],
                                    factors["up"], factors["down"], spec.bank_map, act_fn, dtype=dtype,
                                    basis_dtype=basis_dtype)
    elif spec.form == "shared_core":  # offline/shared_core.py
        from offline.shared_core import experts_from_tensors

        module = experts_from_tensors(tensors.get, prefix, projections, spec.num_experts, act_fn, dtype)
    else:
        factors = {}
        for what, proj in projections.items():
            stems = [f"{prefix}.experts.{e}.{proj}" for e in range(spec.num_experts)]
            factors[f"{what}_a"] = _stack(tensors, [f"{s}.lora_a" for s in stems])
            factors[f"{what}_b"] = _stack(tensors, [f"{s}.lora_b" for s in stems])
        module = PerExpertLowRankExperts(factors, act_fn, dtype=dtype)
    return module, set(expected_layer_tensors(model_type, layer_index, spec, dims, ""))


def _load_dense_experts(tensors: CheckpointTensors, model_type: str, layer_index: int, dims: MoEDims,
                        experts: nn.Module) -> list[str]:
    """Fill a non-decomposed layer's fused transformers experts from the checkpoint."""
    dense = read_layer_experts(tensors, model_type, layer_index, dims)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([dense.gate, dense.up], dim=1))
        experts.down_proj.copy_(dense.down)
    return dense.source_names


def _load_remaining_tensors(model: PreTrainedModel, tensors: CheckpointTensors, model_type: str,
                            consumed: set[str], filled: set[str]) -> None:
    """Load every not-yet-consumed tensor by name; fail on unused, missing or wrongly shaped tensors.

    `filled`: model parameter names already set (the experts of every MoE layer).
    """
    state = {module_name(model_type, name): tensors.get(name)
             for name in tensors.names() if name not in consumed}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches
        raise CheckpointError(f"{tensors.model_dir}: {error}") from None
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)
        raise CheckpointError(f"{tensors.model_dir}: tensor(s) the model does not use: {unexpected[:4]}"
                              f"{' ...' if len(unexpected) > 4 else ''}")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - filled - tied)
    if missing:
        raise CheckpointError(f"{tensors.model_dir}: tensor(s) missing from the checkpoint: {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''}")
    if tied:
        model.tie_weights()


def _parameter_names_of(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    owned = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in owned}
