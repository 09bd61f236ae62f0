"""Input checks of `moesvd recover`, all before any work or any file is written.

* COMPRESSED must be ours: a config.json with a valid `moe_svd` block (else: compress it first).
* The teacher must be a dense checkpoint (no `moe_svd` block) of the same architecture (`model_type` and
  the block's `original_architectures`) and shape: the MoE dimensions and layer count agree, every tensor
  the compressed checkpoint copied from its original (attention, norms, embeddings, routers, layers kept
  dense) exists in the teacher with the same shape, and every decomposed layer has dense experts there.
* OUT must not exist (unless `force`) and must not be, or lie inside, either input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesvd_vllm.architectures import MoEDims, moe_dims, moe_layout
from moesvd_vllm.errors import ArchitectureError, CheckpointError, MoESVDError
from moesvd_vllm.format.directories import check_output_dir
from moesvd_vllm.format.schema import (
    CONFIG_KEY,
    MoESVDConfig,
    decomposed_layer_params,
    expected_layer_tensors,
)
from moesvd_vllm.format.directories import read_config
from offline.expert_tensors import CheckpointTensors, fused_expert_names, per_expert_names

_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "head_dim")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class RecoveryInputError(MoESVDError):
    """COMPRESSED, the teacher or OUT cannot be used; nothing was written."""


@dataclass
class RecoveryInputs:
    compressed: Path
    teacher: Path
    block: MoESVDConfig
    dims: MoEDims
    original_config: dict[str, Any]  # the compressed config.json as the original's (block removed)
    teacher_config: dict[str, Any]
    tokenizer_dir: Path
    trainable_params: int  # stored parameters of the decomposed layers


def _config(model_dir: Path, what: str) -> dict[str, Any]:
    if not (model_dir / "config.json").is_file():
        raise RecoveryInputError(f"{what} {model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    return read_config(model_dir)


def _compressed_block(model_dir: Path, config: dict[str, Any]) -> MoESVDConfig:
    if CONFIG_KEY not in config:
        raise RecoveryInputError(
            f"{model_dir} is not a moesvd compressed checkpoint (its config.json has no `{CONFIG_KEY}` block): "
            "recover a checkpoint written by `moesvd compress` (compress this dense one first). Nothing was "
            "written.")
    return MoESVDConfig.from_dict(config[CONFIG_KEY])


def _mismatch(teacher: Path, compressed: Path, detail: str) -> RecoveryInputError:
    return RecoveryInputError(
        f"teacher {teacher} is not the model {compressed} was compressed from: {detail}; pass the dense "
        "original as --teacher. Nothing was written.")


def _check_teacher_config(teacher: Path, compressed: Path, teacher_config: dict, original: dict,
                          block: MoESVDConfig) -> None:
    if CONFIG_KEY in teacher_config:
        raise RecoveryInputError(f"teacher {teacher} is itself a compressed checkpoint (`{CONFIG_KEY}` in its "
                                 "config.json); the teacher must be the dense original. Nothing was written.")
    if teacher_config.get("model_type") != original.get("model_type"):
        raise _mismatch(teacher, compressed, f"model_type {teacher_config.get('model_type')!r}, the compressed "
                                             f"checkpoint's is {original.get('model_type')!r}")
    if list(teacher_config.get("architectures") or []) != list(block.original_architectures):
        raise _mismatch(teacher, compressed, f"architectures {teacher_config.get('architectures')}, the "
                                             f"compressed checkpoint's original was {block.original_architectures}")
    try:
        teacher_dims = moe_dims(teacher_config)
    except ArchitectureError as error:
        raise _mismatch(teacher, compressed, str(error)) from None
    if teacher_dims != moe_dims(original):
        raise _mismatch(teacher, compressed, f"MoE dimensions {teacher_dims}, the compressed checkpoint's are "
                                             f"{moe_dims(original)}")
    for key in _SHAPE_KEYS:
        if teacher_config.get(key) != original.get(key):
            raise _mismatch(teacher, compressed, f"{key} = {teacher_config.get(key)}, the compressed "
                                                 f"checkpoint has {original.get(key)}")


def _check_teacher_tensors(teacher: Path, compressed: Path, block: MoESVDConfig, original: dict,
                           dims: MoEDims) -> None:
    model_type = original["model_type"]
    teacher_tensors, student_tensors = CheckpointTensors(teacher), CheckpointTensors(compressed)
    decomposed: set[str] = set()
    for index in block.decomposed_layers:
        decomposed.update(expected_layer_tensors(model_type, index, block.layer(index), dims, ""))
        fused = [n for n in fused_expert_names(model_type, index) if n in teacher_tensors]
        names = fused or [n for e in range(dims.num_experts) for n in per_expert_names(model_type, index, e)]
        missing = [n for n in names if n not in teacher_tensors]
        if missing:
            raise _mismatch(teacher, compressed, f"it has no dense experts in decomposed layer {index} "
                                                 f"(missing {missing[0]})")
    for name in student_tensors.names():
        if name in decomposed:
            continue
        if name not in teacher_tensors:
            raise _mismatch(teacher, compressed, f"tensor {name} of the compressed checkpoint is not in the teacher")
        if teacher_tensors.shape(name) != student_tensors.shape(name):
            raise _mismatch(teacher, compressed, f"tensor {name} has shape {list(teacher_tensors.shape(name))} "
                                                 f"in the teacher, {list(student_tensors.shape(name))} in the "
                                                 "compressed checkpoint")


def _check_output(out_dir: Path, inputs: list[Path], force: bool) -> None:
    check_output_dir(out_dir, force)
    resolved = out_dir.resolve()
    for path in inputs:
        path = path.resolve()
        if resolved == path or path in resolved.parents:
            raise RecoveryInputError(f"output directory {out_dir} is (inside) the input {path}; write elsewhere")


def _tokenizer_dir(teacher: Path, compressed: Path) -> Path:
    for candidate in (teacher, compressed):
        if any((candidate / name).is_file() for name in _TOKENIZER_FILES):
            return candidate
    raise RecoveryInputError(f"neither {teacher} nor {compressed} has tokenizer files ({_TOKENIZER_FILES}); "
                             "copy the original model's tokenizer into the teacher directory")


def check_inputs(compressed_dir: str | os.PathLike, teacher_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 force: bool) -> RecoveryInputs:
    compressed, teacher, out = Path(compressed_dir), Path(teacher_dir), Path(out_dir)
    config = _config(compressed, "compressed checkpoint")
    block = _compressed_block(compressed, config)
    original = {k: v for k, v in config.items() if k != CONFIG_KEY}
    original["architectures"] = list(block.original_architectures)
    moe_layout(original.get("model_type", ""))
    dims = moe_dims(original)
    teacher_config = _config(teacher, "teacher")
    _check_teacher_config(teacher, compressed, teacher_config, original, block)
    try:
        _check_teacher_tensors(teacher, compressed, block, original, dims)
    except (FileNotFoundError, CheckpointError) as error:
        raise RecoveryInputError(f"cannot read the checkpoints: {error}. Nothing was written.") from None
    _check_output(out, [compressed, teacher], force)
    trainable = sum(decomposed_layer_params(block.layer(i), dims) for i in block.decomposed_layers)
    return RecoveryInputs(compressed, teacher, block, dims, original, teacher_config,
                          _tokenizer_dir(teacher, compressed), trainable)
