"""Load-time validation of a compressed checkpoint against the schema (moesvd_vllm/format/schema.py).

vLLM's loaders narrow a smaller tensor into a larger parameter and drop names nothing claims, so a
checkpoint that disagrees with its `moe_svd` block could load "successfully" and serve garbage. The
validator sits between the checkpoint iterator and vLLM's loader: it checks every tensor of a decomposed
MoE layer as it streams past (shape at once, before vLLM copies it anywhere) and, once everything streamed,
that every expected tensor arrived with the expected dtype and nothing unexpected came with it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moesvd_vllm.architectures import MoEDims, moe_layout

from moesvd_vllm.format.schema import CONFIG_KEY, LayerSpec, MoESVDConfig, expected_layer_tensors

logger = logging.getLogger("vllm.moesvd_vllm.loading")

_MODEL_DTYPE = "<model dtype>"  # placeholder: factors are stored in the dtype of the rest of the model
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_FIX = ("The checkpoint does not match its config.json `moe_svd` block: re-create it with `moesvd "
        "compress` (or restore the missing/damaged shard).")


class CheckpointMismatchError(ValueError):
    """A compressed checkpoint's tensors do not match its `moe_svd` block."""


@dataclass
class _Layer:
    index: int
    spec: LayerSpec
    prefix: str  # "model.layers.L.mlp."
    router: str  # "model.layers.L.mlp.gate.weight"
    expected: dict[str, tuple[tuple[int, ...], str]]
    seen: dict[str, tuple[tuple[int, ...], str]]


if TYPE_CHECKING:
    import torch


def _dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


class CompressedCheckpointValidator:
    """Checks the tensors of the decomposed MoE layers in `layer_indices` (the layers of this rank)."""

    def __init__(self, model_type: str, config: MoESVDConfig, dims: MoEDims, layer_indices: Iterable[int]):
        layout = moe_layout(model_type)
        present = set(layer_indices)
        self.layers: dict[int, _Layer] = {}
        for index in config.decomposed_layers:
            spec = config.layer(index)
            if spec.num_experts != dims.num_experts:
                raise CheckpointMismatchError(
                    f"decoder layer {index}: {CONFIG_KEY}.layers.{index}.num_experts={spec.num_experts} but "
                    f"config.json has {dims.num_experts} routed experts. {_FIX}")
            if index not in present:
                continue
            prefix = f"model.layers.{index}.{layout.moe_module}."
            self.layers[index] = _Layer(
                index=index, spec=spec, prefix=prefix, router=f"{prefix}{layout.router}.weight",
                expected=expected_layer_tensors(model_type, index, spec, dims, _MODEL_DTYPE), seen={})
        self.dims = dims

    def inspect(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Pass `weights` through unchanged, checking each tensor of a decomposed layer on the way."""
        for name, tensor in weights:
            self.check(name, tuple(tensor.shape), _dtype_name(tensor.dtype))
            yield name, tensor

    def _layer_of(self, name: str) -> _Layer | None:
        match = _LAYER_NAME.match(name)
        if match is None:
            return None
        layer = self.layers.get(int(match.group(1)))
        return layer if layer is not None and name.startswith(layer.prefix) else None

    def check(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        """Check one checkpoint tensor (`dtype` as a schema string, e.g. "float32")."""
        layer = self._layer_of(name)
        if layer is None:
            return
        if name in layer.expected:
            expected_shape = layer.expected[name][0]
            if shape != expected_shape:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}, tensor {name}: shape {list(shape)} in the checkpoint, "
                    f"expected {list(expected_shape)} for rank {layer.spec.rank}, {layer.spec.num_banks} "
                    f"bank(s), hidden {self.dims.hidden}, intermediate {self.dims.intermediate} "
                    f"({CONFIG_KEY}.layers.{layer.index}). {_FIX}")
        elif name == layer.router:
            expected_shape = (self.dims.num_experts, self.dims.hidden)
            if shape != expected_shape:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}, router {name}: shape {list(shape)}, expected "
                    f"{list(expected_shape)}. {_FIX}")
        elif name[len(layer.prefix):].startswith(("experts.", "moe_svd")):
            raise CheckpointMismatchError(
                f"decoder layer {layer.index}, tensor {name}: not part of a shared_basis layer with "
                f"{layer.spec.num_banks} bank(s) ({CONFIG_KEY}.layers.{layer.index}); dense or stale "
                f"expert tensors left in a compressed layer? {_FIX}")
        layer.seen[name] = (shape, dtype)

    def finish(self) -> None:
        """After all weights streamed: every expected tensor arrived, in the expected dtype."""
        for layer in self.layers.values():
            missing = sorted(set(layer.expected) - set(layer.seen))
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}: tensor(s) {', '.join(missing[:3])}{more} missing from the "
                    f"checkpoint. {_FIX}")
            if layer.router not in layer.seen:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}: router {layer.router} missing from the checkpoint. {_FIX}")
            model_dtype = layer.seen[layer.router][1]
            for name, (_, expected_dtype) in sorted(layer.expected.items()):
                wanted = model_dtype if expected_dtype == _MODEL_DTYPE else expected_dtype
                got = layer.seen[name][1]
                if got != wanted:
                    source = ("the model dtype (that of the router)" if expected_dtype == _MODEL_DTYPE
                              else f"{CONFIG_KEY}.layers.{layer.index}.basis_dtype")
                    raise CheckpointMismatchError(
                        f"decoder layer {layer.index}, tensor {name}: dtype {got} in the checkpoint, "
                        f"expected {wanted} ({source}). {_FIX}")
        logger.debug("moesvd: validated %d decomposed MoE layer(s) against the checkpoint schema",
                      len(self.layers))
