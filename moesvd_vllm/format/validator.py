"""The one check of a compressed checkpoint's tensors against its `moe_svd` block.

Fed `(name, shape, dtype)` triples: from the safetensors headers (`validate_checkpoint_files`: the
plugin's pre-flight, the PyTorch reference, the writer's final check) or from the tensors vLLM is loading
(`inspect`: the plugin's load step). vLLM's loaders narrow a smaller tensor into a larger parameter and
drop names nothing claims, so a checkpoint that disagrees with its block could otherwise load and serve
garbage. For every decomposed layer it checks each tensor's shape as it streams past and, in `finish`,
that every tensor of `schema.expected_layer_tensors` arrived with its dtype (factors in the model's dtype,
that of the router; bases in `basis_dtype`) and nothing else sits under the layer's experts. Every error
names the decoder layer, the tensor and the fix. Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moesvd_vllm.architectures import MoEDims, moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.errors import CheckpointError
from moesvd_vllm.format.safetensors_io import checkpoint_tensor_infos, dtype_name
from moesvd_vllm.format.schema import CONFIG_KEY, LayerSpec, MoESVDConfig, expected_layer_tensors, SchemaError

logger = logging.getLogger("vllm.moesvd_vllm.format.validator")

MODEL_DTYPE = "<model dtype>"  # placeholder: factors are stored in the dtype of the rest of the model
READER_FIX = ("The checkpoint does not match its config.json `moe_svd` block: re-create it with `moesvd "
              "compress` (or restore the missing/damaged shard).")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointMismatchError(CheckpointError):
    """A compressed checkpoint's tensors do not match its `moe_svd` block."""


@dataclass
class _Layer:
    index: int
    spec: LayerSpec
    prefix: str  # "model.layers.L.mlp."
    router: str  # "model.layers.L.mlp.gate.weight"
    expected: dict[str, tuple[tuple[int, ...], str]]
    seen: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def describe(self, dims: MoEDims) -> str:
        banks = (f"{self.spec.num_banks} bank(s)" if self.spec.form == "shared_basis"
                 else f"{self.spec.num_experts} experts")
        return (f"{self.spec.form} rank {self.spec.rank}, {banks}, hidden {dims.hidden}, intermediate "
                f"{self.spec.kept_intermediate(dims)}, bases {'yes' if self.spec.bases else 'no'}")


class CheckpointValidator:
    """Checks the tensors of the decomposed MoE layers in `layer_indices` (default: all; a pipeline rank
    passes its own layers). `moe_layers`, when given, are the model's MoE layers: a decomposed layer
    outside them is refused. `fix` ends every message (what the user should do)."""

    def __init__(self, model_type: str, config: MoESVDConfig, dims: MoEDims,
                 layer_indices: Iterable[int] | None = None, *, moe_layers: Iterable[int] | None = None,
                 fix: str = READER_FIX):
        layout = moe_layout(model_type)
        self.dims = dims
        self.fix = fix
        present = None if layer_indices is None else set(layer_indices)
        moe = None if moe_layers is None else sorted(moe_layers)
        self.layers: dict[int, _Layer] = {}
        if moe is not None and config.skipping is not None:
            try:
                config.skipping.validate_layers(moe, f"{CONFIG_KEY}.skipping")
            except SchemaError as error:
                raise CheckpointMismatchError(f"{error}. {fix}") from None
        for index in config.decomposed_layers:
            spec = config.layer(index)
            if moe is not None and index not in moe:
                raise CheckpointMismatchError(
                    f"{CONFIG_KEY}.layers.{index}: decoder layer {index} is not a MoE layer of this "
                    f"{model_type} model (MoE layers: {moe}). {fix}")
            if spec.num_experts != dims.num_experts:
                raise CheckpointMismatchError(
                    f"decoder layer {index}: {CONFIG_KEY}.layers.{index}.num_experts={spec.num_experts} but "
                    f"config.json has {dims.num_experts} routed experts. {fix}")
            if present is not None and index not in present:
                continue
            prefix = f"model.layers.{index}.{layout.moe_module}."
            self.layers[index] = _Layer(
                index=index, spec=spec, prefix=prefix, router=f"{prefix}{layout.router}.weight",
                expected=expected_layer_tensors(model_type, index, spec, dims, MODEL_DTYPE))

    @classmethod
    def for_config(cls, config: dict[str, Any], block: MoESVDConfig, layer_indices: Iterable[int] | None = None,
                   *, fix: str = READER_FIX) -> "CheckpointValidator":
        """The validator of a checkpoint whose config.json is `config` (a dict) and `moe_svd` block `block`."""
        return cls(config.get("model_type", ""), block, moe_dims(config), layer_indices,
                   moe_layers=moe_layer_indices(config), fix=fix)

    def inspect(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Pass `(name, tensor)` pairs through unchanged, checking each tensor of a decomposed layer."""
        for name, tensor in weights:
            self.check(name, tuple(tensor.shape), dtype_name(tensor.dtype))
            yield name, tensor

    def _layer_of(self, name: str) -> _Layer | None:
        match = _LAYER_NAME.match(name)
        if match is None:
            return None
        layer = self.layers.get(int(match.group(1)))
        return layer if layer is not None and name.startswith(layer.prefix) else None

    def check(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        """Check one checkpoint tensor (`dtype` as a schema name, e.g. "float32")."""
        layer = self._layer_of(name)
        if layer is None:
            return
        shape = tuple(shape)
        if name in layer.expected:
            expected_shape = layer.expected[name][0]
            if shape != expected_shape:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}, tensor {name}: shape {list(shape)} in the checkpoint, "
                    f"expected {list(expected_shape)} for {layer.describe(self.dims)} "
                    f"({CONFIG_KEY}.layers.{layer.index}). {self.fix}")
        elif name == layer.router:
            expected_shape = (self.dims.num_experts, self.dims.hidden)
            if shape != expected_shape:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}, router {name}: shape {list(shape)}, expected "
                    f"{list(expected_shape)}. {self.fix}")
        elif name[len(layer.prefix):].startswith(("experts.", "moe_svd")):
            raise CheckpointMismatchError(
                f"decoder layer {layer.index}, tensor {name}: unexpected, not part of a "
                f"{layer.describe(self.dims)} ({CONFIG_KEY}.layers.{layer.index}); dense or stale expert "
                f"tensors left in a compressed layer? {self.fix}")
        layer.seen[name] = (shape, dtype)

    def finish(self) -> None:
        """After every tensor was checked: each expected tensor arrived, in the expected dtype."""
        for layer in self.layers.values():
            missing = sorted(set(layer.expected) - set(layer.seen))
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}: tensor(s) {', '.join(missing[:3])}{more} missing from the "
                    f"checkpoint ({layer.describe(self.dims)}). {self.fix}")
            if layer.router not in layer.seen:
                raise CheckpointMismatchError(
                    f"decoder layer {layer.index}: router {layer.router} missing from the checkpoint. "
                    f"{self.fix}")
            model_dtype = layer.seen[layer.router][1]
            for name, (_, expected_dtype) in sorted(layer.expected.items()):
                wanted = model_dtype if expected_dtype == MODEL_DTYPE else expected_dtype
                got = layer.seen[name][1]
                if got != wanted:
                    source = ("the model dtype (that of the router)" if expected_dtype == MODEL_DTYPE
                              else f"{CONFIG_KEY}.layers.{layer.index}.basis_dtype")
                    raise CheckpointMismatchError(
                        f"decoder layer {layer.index}, tensor {name}: dtype {got} in the checkpoint, "
                        f"expected {wanted} ({source}). {self.fix}")
        logger.debug("moesvd: validated %d decomposed MoE layer(s) against the checkpoint schema",
                     len(self.layers))


def validate_checkpoint_files(model_dir: str | os.PathLike, config: dict[str, Any], block: MoESVDConfig,
                              layer_indices: Iterable[int] | None = None) -> CheckpointValidator:
    """Validate a local compressed checkpoint from its safetensors headers (no tensor data is read).

    Every shard is opened by safetensors, so a truncated or damaged file fails here, naming the file."""
    validator = CheckpointValidator.for_config(config, block, layer_indices)
    for name, (shape, dtype) in checkpoint_tensor_infos(model_dir):
        validator.check(name, shape, dtype)
    validator.finish()
    return validator
