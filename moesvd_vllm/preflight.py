"""Pre-flight check of a compressed checkpoint, run by vLLM while it builds its config (API server).

vLLM calls `verify_and_update_config(vllm_config)` of the class registered for the model's architecture in
`vllm.model_executor.models.config.MODELS_CONFIG_MAP` before it spawns the engine. For the plugin
architectures that is `CompressedCheckpointPreflight`: it validates the `moe_svd` block (format version,
servable forms, layer indices) and, for a local directory of safetensors files, reads only the file
headers to check every decomposed layer's tensors (names, shapes, dtypes) and that no shard is truncated.
A broken checkpoint so fails in seconds, before any weight is read; the load-time check inside the worker
(moesvd_vllm/loading.py) still guards every other way of loading weights.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from moesvd_vllm.loading import CheckpointMismatchError, CompressedCheckpointValidator
from moesvd_vllm.architectures import moe_dims, moe_layer_indices

logger = logging.getLogger("vllm.moesvd_vllm.preflight")

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_INDEX_FILE = "model.safetensors.index.json"


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors file's header; raises if the file is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointMismatchError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointMismatchError(
                f"{path}: truncated (header says {header_len} header bytes, the file has {size}); "
                "re-copy or re-create the checkpoint")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as error:
            raise CheckpointMismatchError(f"{path}: unreadable safetensors header ({error})") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointMismatchError(
            f"{path}: truncated: its tensors need {8 + header_len + data_end} bytes, the file has {size}; "
            "re-copy or re-create the checkpoint")
    return {name: (tuple(entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
            for name, entry in header.items()}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files vLLM will read (the index's files when there is one)."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointMismatchError(f"{index} lists shard(s) that do not exist: {missing}")
        return files
    return sorted(model_dir.glob("*.safetensors"))


def check_checkpoint_files(model_dir: Path, hf_config, compression) -> bool:
    """Validate the decomposed layers' tensors from the file headers; False when there is nothing to read."""
    files = checkpoint_files(model_dir)
    if not files:
        return False
    config = hf_config.to_dict()
    validator = CompressedCheckpointValidator(config["model_type"], compression, moe_dims(config),
                                              moe_layer_indices(config))
    for path in files:
        for name, (shape, dtype) in safetensors_header(path).items():
            validator.check(name, shape, dtype)
    validator.finish()
    return True


class CompressedCheckpointPreflight:
    """`MODELS_CONFIG_MAP` entry of the plugin architectures (vLLM calls the two static methods)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from moesvd_vllm.layers import compression_config

        model_config = vllm_config.model_config
        hf_config = model_config.hf_text_config
        compression = compression_config(hf_config)
        model_dir = Path(model_config.model)
        if model_dir.is_dir() and check_checkpoint_files(model_dir, hf_config, compression):
            logger.info("moesvd: %s: %d MoE-SVD layer(s) (method %s), checkpoint files match the schema",
                        model_dir.name, len(compression.layers), compression.method)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
