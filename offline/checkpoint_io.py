"""Checkpoint input/output for the compressor: verified shards, one decoder layer at a time, atomic output.

Builds on `offline.expert_tensors` (lazy tensor access, per-expert or fused expert reading, sharded writer)
and adds what the compressor needs on top:

* `verify_shards`: every shard named by the index exists and is as long as its safetensors header says
  (a truncated download is reported before hours of calibration, not in the middle of writing).
* `layer_state_dict`: the tensors of one decoder layer under the names the in-memory transformers 5
  module uses (fused `experts.gate_up_proj` / `experts.down_proj`, `mlp.` for Mixtral's
  `block_sparse_moe.`, `mlp.router.` for PhiMoE's `block_sparse_moe.gate.`), from either on-disk form.
* `AtomicCheckpoint`: a temporary directory next to the target that becomes the target only when complete;
  an existing target is refused unless `force`, and replaced only at the very end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from moesvd_vllm.architectures import MoEDims, hub_name
from offline.expert_tensors import (
    INDEX_FILE,
    CheckpointTensors,
    fused_expert_names,
    per_expert_names,
    read_layer_experts,
)

logger = logging.getLogger(__name__)

class CheckpointError(ValueError):
    """The input checkpoint is incomplete or inconsistent."""


def _safetensors_expected_size(path: Path) -> int:
    """File size a safetensors file must have according to its own header."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated (shorter than a safetensors header); re-download it")
        (header_len,) = struct.unpack("<Q", prefix)
        header_bytes = handle.read(header_len)
    if len(header_bytes) < header_len:
        raise CheckpointError(f"{path} is truncated inside its header; re-download it")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}); re-download it") from None
    end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
    return 8 + header_len + end


def verify_shards(model_dir: str | os.PathLike) -> list[Path]:
    """Check that every weight shard exists and is complete; returns the shard paths."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({model_dir / name for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard(s) {missing} named by {INDEX_FILE} are missing; "
                "download the complete checkpoint")
    else:
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are read)")
    for path in shards:
        expected, actual = _safetensors_expected_size(path), path.stat().st_size
        if actual < expected:
            raise CheckpointError(
                f"{path} is truncated: {actual} bytes, its header needs {expected}; re-download it")
    return shards


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


class OutputExistsError(FileExistsError):
    """The output directory exists and `force` was not given."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while writing, so `finally` blocks remove the temporary directory."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def _raise(signum, frame):  # noqa: ARG001
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(
            f"output directory {out_dir} already exists; choose another --out or pass --force to replace it")
    return out_dir


@contextlib.contextmanager
def atomic_checkpoint_dir(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary directory next to `out_dir`; it becomes `out_dir` only if the block succeeds.

    An interrupted or failed run (exception, Ctrl-C, SIGTERM) removes the temporary directory; an existing
    `out_dir` (allowed only with `force`) is replaced at the very end, so it survives a failed run.
    The temporary name starts with '.' and ends in '.partial', so it never looks like a finished checkpoint.
    """
    out_dir = check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        with _sigterm_as_exception():
            yield tmp
            if out_dir.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
                out_dir.rename(trash / "old")
                tmp.rename(out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
