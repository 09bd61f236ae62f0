"""The dense checkpoint that computes exactly what a compressed one computes (debugging and comparisons).

`expand_to_dense_state_dict(model_dir)` multiplies every decomposed layer's factors back into per-expert
Hub tensors (with offline.reference's expert modules, in float64); `write_dense_equivalent_checkpoint`
writes them as a checkpoint of the original architecture, so plain transformers or stock vLLM evaluates
the compressed model's math.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moesvd_vllm.architectures import moe_dims
from moesvd_vllm.format.directories import read_config, write_checkpoint
from moesvd_vllm.format.schema import CONFIG_KEY, MoESVDConfig, read_moe_svd_config
from moesvd_vllm.format.validator import validate_checkpoint_files
from offline.expert_tensors import CheckpointTensors, per_expert_names
from offline.reference import build_compressed_experts


def _pad_neurons(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, intermediate: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate/up [E, I', H] and down [E, H, I'] padded with zero neurons to I."""
    missing = intermediate - gate.shape[1]
    if missing == 0:
        return gate, up, down
    rows = gate.new_zeros(gate.shape[0], missing, gate.shape[2])
    columns = down.new_zeros(down.shape[0], down.shape[1], missing)
    return torch.cat([gate, rows], 1), torch.cat([up, rows], 1), torch.cat([down, columns], 2)


def expand_to_dense_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense checkpoint (Hub names, float32 experts) that computes exactly what `model_dir` computes.

    Decomposed experts become W_gate = gate_k A, W_up = up_k A, W_down = B down_k (shared_basis) or
    lora_b lora_a (per_expert); every other tensor is copied. Experts that keep I' < I neurons get I - I'
    zero neurons appended (zero gate/up rows and down columns contribute nothing: exactly equivalent). Load it into the original architecture to
    compare a compressed checkpoint with plain transformers.
    """
    block = read_moe_svd_config(model_dir)
    tensors = CheckpointTensors(model_dir)
    if block is None:
        return {name: tensors.get(name) for name in tensors.names()}
    raw_config = read_config(model_dir)
    model_type, dims = raw_config["model_type"], moe_dims(raw_config)
    validate_checkpoint_files(model_dir, raw_config, block)
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for layer_index in block.decomposed_layers:
        spec = block.layer(layer_index)
        experts, names = build_compressed_experts(tensors, model_type, layer_index, spec, dims,
                                                   nn.SiLU(), torch.float64)
        consumed.update(names)
        gate, up, down = _pad_neurons(*experts.dense_weights(), dims.intermediate)
        for expert in range(dims.num_experts):
            gate_name, up_name, down_name = per_expert_names(model_type, layer_index, expert)
            out[gate_name] = gate[expert].float()
            out[up_name] = up[expert].float()
            out[down_name] = down[expert].float()
    for name in tensors.names():
        if name not in consumed:
            out[name] = tensors.get(name)
    return out


def write_dense_equivalent_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                                      overwrite: bool = False) -> Path:
    """Write `expand_to_dense_state_dict(model_dir)` as a dense checkpoint of the original architecture.

    Plain transformers (or stock vLLM) then evaluates exactly the compressed model's math; expanded
    experts are stored in float32 so the expansion adds no rounding.
    """
    config = read_config(model_dir)
    block = config.pop(CONFIG_KEY, None)
    if block is not None:
        config["architectures"] = list(MoESVDConfig.from_dict(block).original_architectures)
    state = expand_to_dense_state_dict(model_dir)
    return write_checkpoint(out_dir, config, ((name, state[name]) for name in sorted(state)),
                            side_files_from=model_dir, replace=overwrite)
