"""Reading the routed experts of Hugging Face MoE checkpoints (safetensors only).

Small helpers shared by the compressor, `offline.full_rank` and `offline.reference` (the files themselves
are listed, opened and written by `moesvd_vllm.format.safetensors_io`):

* `CheckpointTensors`: lazy access to the tensors of a checkpoint directory (one file or index + shards).
* `read_layer_experts`: one MoE layer's routed experts as stacked [E, I, H] / [E, H, I] tensors, read from
  either the Hub's per-expert names (`experts.<e>.gate_proj.weight` ...) or the fused 3-D tensors that
  transformers 5 uses in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
* `read_fused_experts`: the same as transformers 5's in-memory [E, 2I, H] / [E, H, I] tensors in a given
  dtype, filled expert by expert (the layer-wise pipeline builds its layers with it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moesvd_vllm.architectures import MoEDims, moe_layout
from moesvd_vllm.format.safetensors_io import dtype_name, open_safetensors, tensor_files, torch_dtype

logger = logging.getLogger(__name__)


class CheckpointTensors:
    """Name -> tensor access to a safetensors checkpoint; tensors are read on demand."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = tensor_files(self.model_dir)

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        try:
            path = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.model_dir}") from None
        with open_safetensors(path, framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with open_safetensors(self._file_of[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as a schema string ("float32", "bfloat16", ...)."""
        with open_safetensors(self._file_of[name]) as handle:
            return dtype_name(handle.get_slice(name).get_dtype())


@dataclass
class LayerExperts:
    """The routed experts of one MoE layer, stacked: gate/up [E, I, H], down [E, H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    source_names: list[str]  # the checkpoint tensors they were read from


def moe_prefix(model_type: str, layer_index: int) -> str:
    """On-disk (Hub) name prefix of a layer's MoE block, e.g. `model.layers.3.block_sparse_moe`."""
    return f"model.layers.{layer_index}.{moe_layout(model_type).moe_module}"


def per_expert_names(model_type: str, layer_index: int, expert: int) -> tuple[str, str, str]:
    """Hub names of expert `expert`'s gate, up and down weights."""
    layout = moe_layout(model_type)
    base = f"{moe_prefix(model_type, layer_index)}.experts.{expert}"
    return (f"{base}.{layout.gate_proj}.weight", f"{base}.{layout.up_proj}.weight",
            f"{base}.{layout.down_proj}.weight")


def fused_expert_names(model_type: str, layer_index: int) -> tuple[str, str]:
    """Names of transformers 5's fused expert tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    base = f"{moe_prefix(model_type, layer_index)}.experts"
    return f"{base}.gate_up_proj", f"{base}.down_proj"


def _stack_into(out: torch.Tensor, names: list[str], tensors: CheckpointTensors) -> torch.Tensor:
    """Fill out[e] from tensor names[e] one at a time (no list of E tensors next to their stack)."""
    for e, name in enumerate(names):
        out[e].copy_(tensors.get(name))
    return out


def read_layer_experts(tensors: CheckpointTensors, model_type: str, layer_index: int,
                       dims: MoEDims) -> LayerExperts:
    """Stacked dense expert weights of one layer, from per-expert or fused tensors."""
    gate_up_name, down_name = fused_expert_names(model_type, layer_index)
    if gate_up_name in tensors and down_name in tensors:
        gate_up, down = tensors.get(gate_up_name), tensors.get(down_name)
        gate, up = gate_up.split(dims.intermediate, dim=1)
        experts = LayerExperts(gate.contiguous(), up.contiguous(), down, [gate_up_name, down_name])
    else:
        names = _per_expert_names_checked(tensors, model_type, layer_index, dims)
        dtype = torch_dtype(tensors.dtype(names[0][0]))
        e, i, h = dims.num_experts, dims.intermediate, dims.hidden
        experts = LayerExperts(
            gate=_stack_into(torch.empty(e, i, h, dtype=dtype), [g for g, _, _ in names], tensors),
            up=_stack_into(torch.empty(e, i, h, dtype=dtype), [u for _, u, _ in names], tensors),
            down=_stack_into(torch.empty(e, h, i, dtype=dtype), [d for _, _, d in names], tensors),
            source_names=[n for triple in names for n in triple])
    _check_expert_shapes(experts, layer_index, dims)
    return experts


def _per_expert_names_checked(tensors: CheckpointTensors, model_type: str, layer_index: int,
                              dims: MoEDims) -> list[tuple[str, str, str]]:
    names = [per_expert_names(model_type, layer_index, e) for e in range(dims.num_experts)]
    missing = [n for triple in names for n in triple if n not in tensors]
    if missing:
        gate_up_name, down_name = fused_expert_names(model_type, layer_index)
        raise KeyError(
            f"layer {layer_index}: expert weights missing from {tensors.model_dir}: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} (expected per-expert Hub names or fused "
            f"{gate_up_name!r}/{down_name!r}); is this a dense {model_type} checkpoint?")
    return names


def read_fused_experts(tensors: CheckpointTensors, model_type: str, layer_index: int, dims: MoEDims,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts as transformers 5 holds them in memory, gate_up_proj [E, 2I, H] and down_proj
    [E, H, I], in `dtype`: filled expert by expert, so the layer's experts exist once (not per-expert
    tensors, their stacks and the concatenation next to each other)."""
    gate_up_name, down_name = fused_expert_names(model_type, layer_index)
    if gate_up_name in tensors and down_name in tensors:
        gate_up, down = tensors.get(gate_up_name).to(dtype), tensors.get(down_name).to(dtype)
    else:
        e, i, h = dims.num_experts, dims.intermediate, dims.hidden
        gate_up, down = torch.empty(e, 2 * i, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype)
        for expert, (gate, up, down_name_e) in enumerate(
                _per_expert_names_checked(tensors, model_type, layer_index, dims)):
            gate_up[expert, :i].copy_(tensors.get(gate))
            gate_up[expert, i:].copy_(tensors.get(up))
            down[expert].copy_(tensors.get(down_name_e))
    intermediate = gate_up.shape[1] // 2
    _check_expert_shapes(LayerExperts(gate_up[:, :intermediate], gate_up[:, intermediate:], down, []),
                         layer_index, dims)
    return gate_up, down


def _check_expert_shapes(experts: LayerExperts, layer_index: int, dims: MoEDims) -> None:
    e, i, h = dims.num_experts, dims.intermediate, dims.hidden
    for what, tensor, shape in (("gate", experts.gate, (e, i, h)), ("up", experts.up, (e, i, h)),
                                ("down", experts.down, (e, h, i))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"layer {layer_index}: {what} experts have shape {tuple(tensor.shape)}, "
                             f"config.json implies {shape}; the checkpoint and its config disagree")
