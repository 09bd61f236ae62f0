"""The files of a checkpoint directory: the one place that reads and writes safetensors and its neighbours.

* dtypes: one table, schema name ("bfloat16") <-> safetensors code ("BF16") <-> torch dtype (lazily);
* headers: `tensor_infos(path)` via `safetensors.safe_open` (no torch), which refuses a truncated file;
* shards: `weight_files(model_dir)` (the index's files, else `*.safetensors`), `tensor_files` (name -> file);
* writing: `ShardedSafetensorsWriter` (shards + index, tensors spilled to disk at once), `write_streaming`
  (one file of known shapes, each tensor made when written), `write_checkpoint` (a plain checkpoint);

Output directories (atomic creation, config.json, side files, `write_checkpoint`) are in
`moesvd_vllm/format/directories.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from safetensors import SafetensorError, safe_open

from moesvd_vllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
PARTIAL_SUFFIX = ".partial"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# ------------------------------------------------------------------------------------------ dtypes
# schema / torch name -> (safetensors code, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
_NAME_OF_CODE = {code: name for name, (code, _) in DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The schema name of a torch dtype, a safetensors code or a name: torch.bfloat16 / "BF16" -> "bfloat16"."""
    text = str(dtype)
    return _NAME_OF_CODE.get(text, text.removeprefix("torch."))


def safetensors_code(dtype: Any) -> str:
    name = dtype_name(dtype)
    try:
        return DTYPES[name][0]
    except KeyError:
        raise CheckpointError(f"dtype {name!r} cannot be stored in safetensors; use one of "
                              f"{sorted(DTYPES)}") from None


def tensor_nbytes(shape: Sequence[int], dtype: Any) -> int:
    return math.prod(shape) * DTYPES[dtype_name(dtype)][1]


def torch_dtype(dtype: "str | torch.dtype", allowed: tuple[str, ...] = FLOAT_DTYPES) -> "torch.dtype":
    """`"bfloat16"` -> torch.bfloat16 (a torch dtype passes through); names outside `allowed` are refused."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype)
    if name not in allowed:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(allowed)}")
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------ reading
class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # schema name, e.g. "bfloat16"


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, framework: str = "numpy") -> Iterator[Any]:
    """`safe_open` with a damaged or truncated file reported as a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the file does not exist; download or copy the complete checkpoint")
    try:
        handle = safe_open(str(path), framework=framework)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: safetensors cannot read this file ({error}): it is truncated or "
                              "damaged; re-download, re-copy or re-create the checkpoint") from None
    with handle:
        yield handle


def tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """name -> (shape, dtype) of every tensor in one safetensors file (header only, no tensor data read)."""
    with open_safetensors(path) as handle:
        slices = {name: handle.get_slice(name) for name in handle.keys()}
        return {name: TensorInfo(tuple(t.get_shape()), dtype_name(t.get_dtype())) for name, t in slices.items()}


def read_weight_map(model_dir: str | os.PathLike) -> dict[str, str] | None:
    """The index's tensor -> file map, or None without an index file."""
    if not (index := Path(model_dir) / INDEX_FILE).is_file():
        return None
    try:
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid safetensors index ({error!r}); re-download it") from None


def weight_files(model_dir: str | os.PathLike, *, required: bool = True) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every `*.safetensors` file."""
    model_dir = Path(model_dir)
    weight_map = read_weight_map(model_dir)
    if weight_map is not None:
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) {missing} named by {INDEX_FILE} are missing; "
                                  "download or copy the complete checkpoint")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files and required:
        other = sorted(p.name for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES) \
            if model_dir.is_dir() else []
        hint = (f" (found {other}: convert them to safetensors, e.g. load with transformers and "
                "save_pretrained(..., safe_serialization=True))" if other else "")
        raise CheckpointError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def verify_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """Every shard exists and safetensors opens it (a truncated download fails here, naming the file)."""
    files = weight_files(model_dir)
    for path in files:
        tensor_infos(path)
    return files


def tensor_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """name -> file of every tensor (the index's map, else read from the files' headers)."""
    model_dir = Path(model_dir)
    weight_map = read_weight_map(model_dir)
    if weight_map is not None:
        return {name: model_dir / file for name, file in weight_map.items()}
    return {name: path for path in weight_files(model_dir) for name in tensor_infos(path)}


def checkpoint_tensor_infos(model_dir: str | os.PathLike) -> Iterator[tuple[str, TensorInfo]]:
    """(name, (shape, dtype)) of every tensor of every shard, from the headers."""
    for path in weight_files(model_dir):
        yield from tensor_infos(path).items()


# ------------------------------------------------------------------------------------------ writing
def _header(entries: Iterable[tuple[str, str, Sequence[int], int]], metadata: dict[str, str]) -> bytes:
    """The JSON header of (name, dtype, shape, bytes) entries stored back to back, padded to 8 bytes."""
    header: dict = {"__metadata__": metadata}
    start = 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape),
                        "data_offsets": [start, start + size]}
        start += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    import torch

    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_streaming(path: Path, entries: Sequence[tuple[str, tuple[int, ...]]], dtype: "torch.dtype",
                    make: Callable[[str], "torch.Tensor"], metadata: dict | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> int:
    """Write `entries` (name, shape) of one dtype to one file, `make(name)` called for each in order: the
    header comes from the shapes, so at most one tensor is alive (a Mixtral-8x7B benchmark layer is ~2.8 GB
    in bf16). Returns the bytes written; a made tensor of another shape or dtype is refused."""
    safetensors_code(dtype)
    sizes = [tensor_nbytes(shape, dtype) for _, shape in entries]
    header = _header(((name, dtype_name(dtype), shape, size) for (name, shape), size in zip(entries, sizes)),
                     metadata or {"format": "pt"})
    written = 0
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, shape in entries:
            tensor = make(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, header says "
                                 f"{tuple(shape)} {dtype}")
            data = _tensor_bytes(tensor)
            f.write(data)
            written += data.nbytes
            del tensor, data
            if on_tensor is not None:
                on_tensor(name)
    return written


class _Spilled(NamedTuple):  # an added tensor: its bytes wait in the spill file at `offset`
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int


_COPY_CHUNK_BYTES = 64 * 2**20


class ShardedSafetensorsWriter:
    """Writes `model-0000k-of-0000n.safetensors` shards plus the index file. Every added tensor goes to a
    spill file at once, so memory holds none of them (a 2 GiB shard is more than a bf16 Qwen3-30B-A3B MoE
    layer); a full shard gets its header and the bytes behind it, ordered as `safetensors.torch.save_file`
    orders them (larger dtypes first, then by name: every tensor aligned to its element size)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[_Spilled] = []
        self._pending_bytes = 0
        self._spill = None
        self._names: set[str] = set()
        self._written: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._flushed_spills: list[Path] = []  # kept until `commit` (a resumed run may need them)

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        dtype = dtype_name(tensor.dtype)
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(self._spill_path(), "w+b")
        offset = self._spill.tell()
        if size:
            self._spill.write(_tensor_bytes(tensor))
        self._pending.append(_Spilled(name, dtype, tuple(tensor.shape), offset, size))
        self._names.add(name)
        self._pending_bytes += size
        self._total_bytes += size

    def _spill_path(self) -> Path:
        return self.out_dir / f"shard-{len(self._written):05d}.spill.tmp"

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._written):05d}.tmp"
        entries = sorted(self._pending, key=lambda t: (-DTYPES[t.dtype][1], t.name))
        header = _header(((t.name, t.dtype, t.shape, t.size) for t in entries), {"format": "pt"})
        with open(path, "wb") as shard:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            for entry in entries:
                self._copy_spilled(entry, shard)
            shard.flush()
            os.fsync(shard.fileno())
        if self._spill is not None:
            self._spill.close()
            self._flushed_spills.append(self._spill_path())
            self._spill = None
        self._written.append((path, [t.name for t in self._pending]))
        self._pending, self._pending_bytes = [], 0
        if not self._keep_spills:
            self._remove_flushed_spills()

    _keep_spills = False  # set by `commit`: spills then wait for the next commit

    def _remove_flushed_spills(self) -> None:
        for path in self._flushed_spills:
            path.unlink(missing_ok=True)
        self._flushed_spills = []

    # ----------------------------------------------------------------------------------- resuming
    def commit(self) -> dict[str, Any]:
        """The writer's state now, durable on disk, as a JSON-able record (`restore` returns to it after a
        kill). The spill files flushed since the last commit are removed only at the next commit (after the
        caller has recorded this state): until then a resumed run can return to the previous state."""
        self._keep_spills = True
        if self._spill is not None:
            self._spill.flush()
            os.fsync(self._spill.fileno())
        state = {"written": [[p.name, len(names)] for p, names in self._written],
                 "pending": [list(t[:3]) + [t.offset, t.size] for t in self._pending],
                 "spill_bytes": self._spill.tell() if self._spill is not None else 0,
                 "total_bytes": self._total_bytes}
        return state

    def release_flushed(self) -> None:
        """The last `commit`'s state is recorded: the spill files only earlier states needed go."""
        self._remove_flushed_spills()

    def restore(self, state: dict[str, Any], names_in_order: Sequence[str]) -> None:
        """Return a fresh writer on the same directory to a state from `commit` (`names_in_order`: every
        tensor added up to it, in order): shards and spills written after it are removed, the open spill is
        cut back to the state's bytes."""
        self._keep_spills = True
        self._written, start = [], 0
        for name, count in state["written"]:
            self._written.append((self.out_dir / name, list(names_in_order[start:start + count])))
            start += count
        self._pending = [_Spilled(n, d, tuple(shape), offset, size) for n, d, shape, offset, size in state["pending"]]
        self._pending_bytes = sum(t.size for t in self._pending)
        self._total_bytes = int(state["total_bytes"])
        self._names = {n for _, names in self._written for n in names} | {t.name for t in self._pending}
        count = len(self._written)
        for path in self.out_dir.glob("shard-*.tmp"):
            if not path.name.endswith(".spill.tmp") and int(path.name.split("-")[1].split(".")[0]) >= count:
                path.unlink()
        for path in self.out_dir.glob("shard-*.spill.tmp"):
            if int(path.name.split("-")[1].split(".")[0]) != count:
                path.unlink()
        spill = self._spill_path()
        if self._pending:
            if not spill.exists() or spill.stat().st_size < state["spill_bytes"]:
                raise CheckpointError(f"{spill}: the partial output is damaged (spill file shorter than its "
                                      "journal says); start over with --force")
            self._spill = open(spill, "r+b")
            self._spill.truncate(state["spill_bytes"])
            self._spill.seek(state["spill_bytes"])
        else:
            spill.unlink(missing_ok=True)

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
        self._remove_flushed_spills()
        return final_paths
