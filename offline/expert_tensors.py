"""Reading and writing the tensors of Hugging Face MoE checkpoints (safetensors only).

Small helpers shared by `offline.full_rank` (writer) and `offline.reference` (reader):

* `CheckpointTensors`: lazy access to the tensors of a checkpoint directory (one file or index + shards).
* `read_layer_experts`: one MoE layer's routed experts as stacked [E, I, H] / [E, H, I] tensors, read from
  either the Hub's per-expert names (`experts.<e>.gate_proj.weight` ...) or the fused 3-D tensors that
  transformers 5 uses in memory (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
* `read_fused_experts`: the same as transformers 5's in-memory [E, 2I, H] / [E, H, I] tensors in a given
  dtype, filled expert by expert (the layer-wise pipeline builds its layers with it).
* `ShardedSafetensorsWriter` and `atomic_output_dir`: write shards + index into a temporary directory that
  is renamed into place only when everything succeeded; added tensors are spilled to disk at once.
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

from moesvd_vllm.architectures import MoEDims, moe_layout

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


_SAFETENSORS_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_COPY_CHUNK_BYTES = 64 * 2**20


@dataclass
class _Spilled:
    """A tensor added to the writer: its bytes wait in the spill file at `offset`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    size: int


class ShardedSafetensorsWriter:
    """Writes `model-0000k-of-0000n.safetensors` shards plus the index file.

    Every added tensor goes to a temporary spill file at once, so memory holds none of them (a shard
    may be 2 GiB, more than a bf16 Qwen3-30B-A3B MoE layer); when a shard is full its header is written
    and the bytes are copied behind it, ordered as `safetensors.torch.save_file` orders them (larger
    dtypes first, then by name: every tensor aligned to its element size)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[_Spilled] = []
        self._pending_bytes = 0
        self._spill = None
        self._names: set[str] = set()
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(self._spill_path(), "w+b")
        data = tensor.detach().cpu().contiguous()
        offset = self._spill.tell()
        if size:
            self._spill.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._pending.append(_Spilled(name, data.dtype, tuple(data.shape), offset, size))
        self._names.add(name)
        self._pending_bytes += size
        self._total_bytes += size

    def _spill_path(self) -> Path:
        return self.out_dir / f"shard-{len(self._written):05d}.spill.tmp"

    def _header(self, entries: list[_Spilled]) -> bytes:
        header: dict = {"__metadata__": {"format": "pt"}}
        start = 0
        for entry in entries:
            header[entry.name] = {"dtype": _SAFETENSORS_CODES[entry.dtype], "shape": list(entry.shape),
                                  "data_offsets": [start, start + entry.size]}
            start += entry.size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._written):05d}.tmp"
        entries = sorted(self._pending, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))
        header = self._header(entries)
        with open(path, "wb") as shard:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            for entry in entries:
                self._copy_spilled(entry, shard)
        if self._spill is not None:
            self._spill.close()
            self._spill_path().unlink()
            self._spill = None
        self._written.append((path, [t.name for t in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def _copy_spilled(self, entry: _Spilled, shard) -> None:
        self._spill.seek(entry.offset)
        left = entry.size
        while left:
            chunk = self._spill.read(min(left, _COPY_CHUNK_BYTES))
            shard.write(chunk)
            left -= len(chunk)

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
