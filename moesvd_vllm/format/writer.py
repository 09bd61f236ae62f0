"""The one writer of compressed checkpoints (the compressor, the exact full-rank conversions and the
synthetic benchmark checkpoints all write through it).

    with CompressedCheckpointWriter(source_config, out_dir, replace=force) as writer:
        writer.add(name, tensor, stage="decomposition")   # spilled to disk at once
        ...
        block = writer.finish(method=..., layers=specs, options=..., side_files_from=source_dir)
        (write reports into writer.directory)
    # only now does out_dir exist, complete

What it guarantees:
* the plugin-only architecture name (`architectures.PLUGIN_ARCHITECTURES`) is resolved when the writer is
  created, so an architecture without a plugin class fails before any work;
* no tensor holding NaN or Inf is ever written: `add` refuses it, naming the tensor, its decoder layer and
  the stage that produced it (the caller's label), and nothing is left behind;
* the `moe_svd` block (parameter counts from the schema) round-trips through JSON and the strict reader;
* every decomposed layer's tensors, as written, pass the same validator the plugin loads with;
* shards + index are written by `ShardedSafetensorsWriter` into an `atomic_directory`: an error, Ctrl-C or
  SIGTERM removes the partial directory, an existing `out_dir` is replaced only at the very end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES, moe_dims, moe_layer_indices
from moesvd_vllm.errors import ArchitectureError, CheckpointError, NonFiniteTensorError
from moesvd_vllm.format.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, dtype_name
from moesvd_vllm.format.directories import atomic_directory, copy_side_files, write_config
from moesvd_vllm.format.schema import (
    CONFIG_KEY,
    BASIS_GROUPS_FORMAT_VERSION,
    FORMAT_VERSION,
    SKIPPING_FORMAT_VERSION,
    SkippingSpec,
    CalibrationInfo,
    LayerSpec,
    MoESVDConfig,
    ParamCounts,
    decomposed_layer_params,
    dense_layer_params,
)
from moesvd_vllm.format.validator import CheckpointValidator

if TYPE_CHECKING:
    import torch

COPIED = "copying from the input checkpoint"
WRITER_FIX = ("The tensors written disagree with the moe_svd block: this is a bug in moesvd-vllm, please "
              "report it with the command line and the model's config.json (another --method may work "
              "meanwhile); nothing was written.")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_FINITE_CHUNK = 1 << 24  # elements checked at a time: a bounded temporary, whatever the tensor's size


def plugin_architectures(config: Mapping[str, Any]) -> list[str]:
    """The plugin-only architecture names replacing config.json's `architectures`."""
    original = list(config.get("architectures") or [])
    unknown = [a for a in original if a not in PLUGIN_ARCHITECTURES]
    if not original or unknown:
        raise ArchitectureError(
            f"architectures {original} of config.json have no MoE-SVD plugin class; supported: "
            f"{sorted(PLUGIN_ARCHITECTURES)}")
    return [PLUGIN_ARCHITECTURES[a] for a in original]


def moe_svd_block(config: Mapping[str, Any], method: str, layers: Mapping[str, LayerSpec],
                  options: Mapping[str, Any], calibration: CalibrationInfo | None = None,
                  skipping: SkippingSpec | None = None) -> MoESVDConfig:
    """The `moe_svd` block of a checkpoint of `config` with decomposed `layers`, read back by the strict
    reader after a JSON round trip (what we write is what the plugin accepts)."""
    dims = moe_dims(dict(config))
    moe_layers = moe_layer_indices(dict(config))
    dense = dense_layer_params(dims)
    compressed = sum(decomposed_layer_params(layers[str(i)], dims) if str(i) in layers else dense
                     for i in moe_layers)
    version = FORMAT_VERSION if skipping is None else SKIPPING_FORMAT_VERSION
    if any(spec.basis_groups > 1 for spec in layers.values()):
        version = BASIS_GROUPS_FORMAT_VERSION
    block = MoESVDConfig(
        format_version=version, method=method,
        original_architectures=list(config.get("architectures") or []), layers=dict(layers),
        params=ParamCounts(expert_dense=dense * len(moe_layers), expert_compressed=compressed),
        options=dict(options), calibration=calibration, skipping=skipping)
    return MoESVDConfig.from_dict(json.loads(json.dumps(block.to_dict())))


def _layer_of(name: str) -> str:
    match = _LAYER_NAME.match(name)
    return f"decoder layer {match.group(1)}" if match else "outside the decoder layers"


def _finite(values: "torch.Tensor") -> bool:
    """NaN and +-Inf propagate to the minimum or maximum: one pass, no boolean copy (a 403 MB bf16 tensor on
    the 2-core machine: 0.56 s, against 5.3 s for `isfinite(values).all()` and 6.7 s to spill it)."""
    import torch

    if values.element_size() == 1:  # float8 (DeepSeek-V3 checkpoints): torch has no aminmax for it
        values = values.float()
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(name: str, tensor: "torch.Tensor", stage: str) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it, its layer and the stage."""
    import torch

    if not tensor.is_floating_point():
        return
    flat = tensor.detach().reshape(-1)
    if all(_finite(flat[i:i + _FINITE_CHUNK]) for i in range(0, flat.numel(), _FINITE_CHUNK)):
        return
    counted = flat.float() if flat.element_size() == 1 else flat
    nan, inf = int(torch.isnan(counted).sum()), int(torch.isinf(counted).sum())
    cause = ("the input checkpoint itself holds non-finite weights: repair or re-download it"
             if stage == COPIED else
             "check the input checkpoint and the calibration data, or try a smaller ratio or another --method")
    raise NonFiniteTensorError(
        f"{name} ({_layer_of(name)}): {nan} NaN and {inf} Inf of {flat.numel()} values, produced by "
        f"{stage}; a checkpoint with non-finite weights is never written: {cause}. Nothing was written.")


class CompressedCheckpointWriter:
    """Writes one compressed checkpoint of the dense checkpoint whose config.json is `source_config`."""

    def __init__(self, source_config: Mapping[str, Any], out_dir: str | os.PathLike, *, replace: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, partial: Path | None = None,
                 resume_from: Mapping[str, Any] | None = None,
                 keep_on_interrupt: Callable[[], bool] | None = None):
        """`partial`, `keep_on_interrupt`: see `atomic_directory`; `resume_from`: a state from `commit`,
        written earlier into `partial` by a killed run, to continue from."""
        if CONFIG_KEY in source_config:
            raise CheckpointError(f"the input is already a compressed checkpoint (config.json has "
                                  f"`{CONFIG_KEY}`); compress a dense one")
        self.source_config = dict(source_config)
        self.architectures = plugin_architectures(self.source_config)
        self.out_dir = Path(out_dir)
        self.replace = replace
        self.max_shard_bytes = max_shard_bytes
        self.directory: Path | None = None  # the partial directory, inside the `with` block
        self.written: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype), as added
        self._stage = "writing"
        self._atomic = None
        self._shards: ShardedSafetensorsWriter | None = None
        self._finished = False
        self._partial, self._resume_from, self._keep = partial, resume_from, keep_on_interrupt
        self._committed = 0  # tensors of `written` recorded by earlier commits

    def __enter__(self) -> "CompressedCheckpointWriter":
        self._atomic = atomic_directory(self.out_dir, replace=self.replace, partial=self._partial,
                                        keep_on_interrupt=self._keep)
        self.directory = self._atomic.__enter__()
        self._shards = ShardedSafetensorsWriter(self.directory, max_shard_bytes=self.max_shard_bytes)
        if self._resume_from is not None:
            self.written = {name: (tuple(shape), dtype) for name, shape, dtype in self._resume_from["added"]}
            self._shards.restore(self._resume_from["shards"], list(self.written))
            self._committed = len(self.written)
        return self

    def commit(self) -> dict[str, Any]:
        """Everything added so far, durable, as a JSON-able state (see `release`): the shards' state and the
        tensors added since the previous commit; `resume_from` takes the last state's "shards" with all
        commits' "added" lists joined."""
        added = list(self.written.items())[self._committed:]
        self._committed = len(self.written)
        return {"shards": self._shards.commit(),
                "added": [[name, list(shape), dtype] for name, (shape, dtype) in added]}

    def release(self) -> None:
        """The last `commit`'s state is recorded by the caller: files only earlier states needed go."""
        self._shards.release_flushed()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            error = CheckpointError(f"{self.out_dir}: the writer was closed before finish(); nothing was written")
            self._atomic.__exit__(CheckpointError, error, None)  # removes the partial directory
            raise error
        return bool(self._atomic.__exit__(exc_type, exc, tb))

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Tensors added inside the block without their own `stage` are attributed to `label`."""
        previous, self._stage = self._stage, label
        try:
            yield
        finally:
            self._stage = previous

    def add(self, name: str, tensor: "torch.Tensor", stage: str | None = None) -> None:
        """Spill one tensor to the shards (refused if it holds NaN/Inf: see `check_finite`)."""
        if self._shards is None:
            raise RuntimeError("CompressedCheckpointWriter.add outside its `with` block")
        check_finite(name, tensor, stage or self._stage)
        self._shards.add(name, tensor)
        self.written[name] = (tuple(tensor.shape), dtype_name(tensor.dtype))

    def finish(self, *, method: str, layers: Mapping[str, LayerSpec], options: Mapping[str, Any],
               calibration: CalibrationInfo | None = None,
               side_files_from: str | os.PathLike | None = None,
               skipping: SkippingSpec | None = None) -> MoESVDConfig:
        """Check the written tensors against the block, then write the last shard, the index, config.json
        (plugin architecture + `moe_svd` block) and the side files of `side_files_from`."""
        block = moe_svd_block(self.source_config, method, layers, options, calibration, skipping)
        validator = CheckpointValidator.for_config(self.source_config, block, fix=WRITER_FIX)
        for name, (shape, dtype) in self.written.items():
            validator.check(name, shape, dtype)
        validator.finish()
        self._shards.finish()
        config = dict(self.source_config)
        config["architectures"] = self.architectures
        config[CONFIG_KEY] = block.to_dict()
        write_config(self.directory, config)
        if side_files_from is not None:
            copy_side_files(side_files_from, self.directory)
        self._finished = True
        return block
