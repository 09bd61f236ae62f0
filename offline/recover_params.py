"""What `moesvd recover` trains: the tensors a compressed checkpoint stores, as module parameters.

A compressed checkpoint is read back into PyTorch modules by `offline.reference` (`SharedBasisExperts`,
`PerExpertLowRankExperts`, `offline.shared_core.SharedCoreExperts`): their parameters are exactly the
stored factors and bases, stacked over banks/experts. `StoredParameter` ties one on-disk tensor name to
the parameter (and row) holding it, so training updates the parameters and writing reads them back under
the same names, shapes and dtypes. Layers without bases (A = B = identity, not stored) keep the identity
frozen; the router is trainable only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moesvd_vllm.architectures import MoEDims, moe_layout
from moesvd_vllm.format.schema import LayerSpec, MoESVDConfig
from offline.checkpoint_io import disk_name
from moesvd_vllm.format.directories import read_config
from offline.expert_tensors import CheckpointTensors, moe_prefix
from offline.reference import PerExpertLowRankExperts, SharedBasisExperts, build_compressed_experts
from offline.shared_core import SharedCoreExperts, tensor_names

_ROUTER_MODULE_NAMES = ("gate", "router")  # transformers 5: Qwen/Mixtral-style `gate`, PhiMoE `router`


@dataclass
class StoredParameter:
    """One stored tensor: `name` on disk, held by `parameter` (row `index` of it when stacked)."""

    name: str
    parameter: nn.Parameter
    index: int | None = None

    def value(self) -> torch.Tensor:
        tensor = self.parameter.detach()
        return tensor if self.index is None else tensor[self.index]

    def load(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.value().copy_(tensor.to(self.parameter.dtype))


def unique_parameters(stored: list[StoredParameter]) -> list[nn.Parameter]:
    """The distinct parameters behind `stored` (stacked ones hold several stored tensors), in order."""
    seen: dict[int, nn.Parameter] = {}
    for s in stored:
        seen.setdefault(id(s.parameter), s.parameter)
    return list(seen.values())


def expert_parameters(experts: nn.Module, spec: LayerSpec, model_type: str, layer_index: int
                      ) -> list[StoredParameter]:
    """The stored tensors of one decomposed layer's experts module (as built by offline.reference)."""
    layout = moe_layout(model_type)
    prefix = moe_prefix(model_type, layer_index)
    projections = {"gate": layout.gate_proj, "up": layout.up_proj, "down": layout.down_proj}
    out: list[StoredParameter] = []
    if isinstance(experts, SharedBasisExperts):
        if spec.bases:
            out += [StoredParameter(f"{prefix}.moe_svd_in.weight", experts.input_basis),
                    StoredParameter(f"{prefix}.moe_svd_out.weight", experts.output_basis)]
        for bank in range(spec.num_banks):
            out += [StoredParameter(f"{prefix}.experts.{bank}.{proj}.weight", getattr(experts, what), bank)
                    for what, proj in projections.items()]
    elif isinstance(experts, PerExpertLowRankExperts):
        for e in range(spec.num_experts):
            for what, proj in projections.items():
                out += [StoredParameter(f"{prefix}.experts.{e}.{proj}.lora_a", getattr(experts, f"{what}_a"), e),
                        StoredParameter(f"{prefix}.experts.{e}.{proj}.lora_b", getattr(experts, f"{what}_b"), e)]
    elif isinstance(experts, SharedCoreExperts):
        for name, (proj, factor, expert) in tensor_names(prefix, projections, spec.num_experts).items():
            out.append(StoredParameter(name, getattr(experts, f"{proj}_{factor}"), expert))
    else:
        raise TypeError(f"layer {layer_index}: {type(experts).__name__} is not a compressed experts module")
    return out


def router_parameter(block: nn.Module, model_type: str, layer_index: int) -> StoredParameter:
    """The router weight of a MoE block ([E, H]) under its on-disk name."""
    layout = moe_layout(model_type)
    stored = f"{moe_prefix(model_type, layer_index)}.{layout.router}.weight"
    for module_name in _ROUTER_MODULE_NAMES:
        module = getattr(block, module_name, None)
        if module is not None and disk_name(model_type, layer_index, f"mlp.{module_name}.weight") == stored:
            return StoredParameter(stored, module.weight)
    raise TypeError(f"layer {layer_index}: no router module {_ROUTER_MODULE_NAMES} in {type(block).__name__}")


def trainable_parameters(experts: nn.Module, block: nn.Module, spec: LayerSpec, model_type: str,
                         layer_index: int, train_router: bool) -> list[StoredParameter]:
    stored = expert_parameters(experts, spec, model_type, layer_index)
    if train_router:
        stored.append(router_parameter(block, model_type, layer_index))
    return stored


def set_trainable(module: nn.Module, stored: list[StoredParameter]) -> None:
    """Freeze every parameter of `module`, then unfreeze those behind `stored`."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for parameter in unique_parameters(stored):
        parameter.requires_grad_(True)


class CompressedSource:
    """A compressed checkpoint being recovered: its block, config and tensors (read on demand)."""

    def __init__(self, model_dir, block: MoESVDConfig, dims: MoEDims):
        self.model_dir = model_dir
        self.block = block
        self.dims = dims
        self.raw_config = read_config(model_dir)
        self.model_type = self.raw_config["model_type"]
        self.tensors = CheckpointTensors(model_dir)

    def spec(self, layer_index: int) -> LayerSpec | None:
        return self.block.layer(layer_index)

    def build_experts(self, layer_index: int, act_fn, dtype: torch.dtype) -> nn.Module:
        """The decomposed layer's experts module, parameters = the stored tensors (frozen)."""
        module, _ = build_compressed_experts(self.tensors, self.model_type, layer_index, self.spec(layer_index),
                                              self.dims, act_fn, dtype)
        return module

    def load_block_parameters(self, block: nn.Module, layer_index: int) -> None:
        """Copy every non-expert tensor of the MoE block (router, shared experts) from this checkpoint."""
        attribute = moe_layout(self.model_type).moe_module
        with torch.no_grad():
            for key, parameter in block.named_parameters():
                if key.startswith("experts."):
                    continue
                name = disk_name(self.model_type, layer_index, f"mlp.{key}")
                if name not in self.tensors:
                    name = f"model.layers.{layer_index}.{attribute}.{key}"
                parameter.copy_(self.tensors.get(name).to(parameter.dtype))
