"""Checkpoint input for the compressor: one decoder layer at a time, from either on-disk expert form.

Builds on `offline.expert_tensors` (lazy tensor access, per-expert or fused expert reading); the files are
verified (`moesvd_vllm.format.safetensors_io.verify_weight_files`: a truncated download is reported before
hours of calibration) and the output is written by `moesvd_vllm.format.writer`.

* `layer_state_dict`: the tensors of one decoder layer under the names the in-memory transformers 5
  module uses (fused `experts.gate_up_proj` / `experts.down_proj`, `mlp.` for Mixtral's
  `block_sparse_moe.`, `mlp.router.` for PhiMoE's `block_sparse_moe.gate.`), from either on-disk form.
* `expert_tensor_names`: the routed-expert tensors of one layer as stored (what a decomposed layer replaces).
"""

from __future__ import annotations

import logging

import torch

from moesvd_vllm.architectures import MoEDims, hub_name
from moesvd_vllm.errors import CheckpointError
from offline.expert_tensors import (
    CheckpointTensors,
    fused_expert_names,
    per_expert_names,
    read_layer_experts,
)

logger = logging.getLogger(__name__)


def disk_name(model_type: str, layer_index: int, in_memory_name: str) -> str:
    """On-disk name of a decoder-layer tensor given its in-memory (relative) name (transformers' own
    renames, reversed: `mlp.router.weight` -> `block_sparse_moe.gate.weight` for phimoe)."""
    return hub_name(model_type, f"model.layers.{layer_index}.{in_memory_name}")


def layer_state_dict(tensors: CheckpointTensors, model_type: str, layer_index: int,
                     module_keys: list[str], dims: MoEDims | None) -> dict[str, torch.Tensor]:
    """Tensors for `module_keys` (the in-memory layer's state-dict keys), read from either on-disk form."""
    state: dict[str, torch.Tensor] = {}
    experts = None
    for key in module_keys:
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            if dims is None:
                raise CheckpointError(f"layer {layer_index}: unexpected routed experts in a dense layer")
            if experts is None:
                experts = read_layer_experts(tensors, model_type, layer_index, dims)
            state[key] = (torch.cat([experts.gate, experts.up], dim=1) if key.endswith("gate_up_proj")
                          else experts.down)
            continue
        name = disk_name(model_type, layer_index, key)
        if name not in tensors:
            raise CheckpointError(
                f"tensor {name!r} (layer {layer_index}) is not in {tensors.model_dir}; the checkpoint does "
                f"not match its config.json ({model_type})")
        state[key] = tensors.get(name)
    return state


def expert_tensor_names(tensors: CheckpointTensors, model_type: str, layer_index: int,
                        num_experts: int) -> list[str]:
    """Names of the routed-expert tensors of one layer as stored (per-expert or fused)."""
    fused = [n for n in fused_expert_names(model_type, layer_index) if n in tensors]
    if fused:
        return fused
    return [n for e in range(num_experts) for n in per_expert_names(model_type, layer_index, e)]
