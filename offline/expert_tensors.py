"""Reading and writing the tensors of Hugging Face MoE checkpoints (safetensors only).

Small helpers shared by `offline.full_rank` (writer) and `offline.reference` (reader):

* `CheckpointTensors`: lazy access to the tensors of a checkpoint directory (one file or index + shards).
* `read_layer_experts`: one MoE layer's routed experts as stacked [E, I, H] / [E, H, I] tensors, read from
  either the Hub's per-expert names (`experts.<e>.gate_proj.weight` ...) or the fused 3-D tensors that
  transformers 5 uses in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
* `ShardedSafetensorsWriter` and `atomic_output_dir`: write shards + index into a temporary directory that
  is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesvd_vllm.schema import MoEDims, moe_layout

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> torch.bfloat16 (torch dtypes pass through)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    try:
        return _DTYPES[key]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a Hugging Face checkpoint directory")
    return json.loads(path.read_text(encoding="utf-8"))


class CheckpointTensors:
    """Name -> tensor access to a safetensors checkpoint; tensors are read on demand."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = self._index_tensor_files()

    def _index_tensor_files(self) -> dict[str, Path]:
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            return {name: self.model_dir / file for name, file in weight_map.items()}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            other = [p.name for p in self.model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES]
            hint = (f" (found {other}: convert them to safetensors, e.g. load with transformers and "
                    "save_pretrained(..., safe_serialization=True))" if other else "")
            raise FileNotFoundError(f"no *.safetensors weights in {self.model_dir}{hint}")
        file_of: dict[str, Path] = {}
        for path in files:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    file_of[name] = path
        return file_of

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        try:
            path = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.model_dir}") from None
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file_of[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as a schema string ("float32", "bfloat16", ...)."""
        with safe_open(self._file_of[name], framework="pt") as handle:
            code = handle.get_slice(name).get_dtype()
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(code, code)


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


def read_layer_experts(tensors: CheckpointTensors, model_type: str, layer_index: int,
                       dims: MoEDims) -> LayerExperts:
    """Stacked dense expert weights of one layer, from per-expert or fused tensors."""
    gate_up_name, down_name = fused_expert_names(model_type, layer_index)
    if gate_up_name in tensors and down_name in tensors:
        gate_up, down = tensors.get(gate_up_name), tensors.get(down_name)
        gate, up = gate_up.split(dims.intermediate, dim=1)
        experts = LayerExperts(gate.contiguous(), up.contiguous(), down, [gate_up_name, down_name])
    else:
        names = [per_expert_names(model_type, layer_index, e) for e in range(dims.num_experts)]
        missing = [n for triple in names for n in triple if n not in tensors]
        if missing:
            raise KeyError(
                f"layer {layer_index}: expert weights missing from {tensors.model_dir}: {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} (expected per-expert Hub names or fused "
                f"{gate_up_name!r}/{down_name!r}); is this a dense {model_type} checkpoint?")
        experts = LayerExperts(
            gate=torch.stack([tensors.get(g) for g, _, _ in names]),
            up=torch.stack([tensors.get(u) for _, u, _ in names]),
            down=torch.stack([tensors.get(d) for _, _, d in names]),
            source_names=[n for triple in names for n in triple])
    _check_expert_shapes(experts, layer_index, dims)
    return experts


def _check_expert_shapes(experts: LayerExperts, layer_index: int, dims: MoEDims) -> None:
    e, i, h = dims.num_experts, dims.intermediate, dims.hidden
    for what, tensor, shape in (("gate", experts.gate, (e, i, h)), ("up", experts.up, (e, i, h)),
                                ("down", experts.down, (e, h, i))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"layer {layer_index}: {what} experts have shape {tuple(tensor.shape)}, "
                             f"config.json implies {shape}; the checkpoint and its config disagree")


class ShardedSafetensorsWriter:
    """Collects tensors and writes `model-0000k-of-0000n.safetensors` shards plus the index file."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        final_paths = []
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.out_dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            final_paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final_paths


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files (config.json excluded)."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if (not path.is_file() or path.name in ("config.json", INDEX_FILE)
                or path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")):
            continue
        shutil.copy2(path, Path(dst_dir) / path.name)
        copied.append(path.name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; rename it to `out_dir` if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_config(out_dir: str | os.PathLike, config: dict) -> None:
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
