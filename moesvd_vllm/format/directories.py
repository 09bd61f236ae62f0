"""Output checkpoint directories: created atomically, with config.json and the side files.

* `atomic_directory`: a hidden `.NAME.<random>.partial` sibling that becomes NAME only when the block
  succeeds (an error, Ctrl-C or SIGTERM removes it, unless a resumable run keeps it: offline/journal.py);
* `check_output_dir`, `read_config` / `write_config`, `copy_side_files` (tokenizer and the like);
* `write_checkpoint`: a plain checkpoint (shards + index + config) in one atomic step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from moesvd_vllm.format.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, PARTIAL_SUFFIX,
                                               WEIGHT_SUFFIXES, ShardedSafetensorsWriter)

if TYPE_CHECKING:
    import torch


class OutputExistsError(FileExistsError):
    """The output directory exists and replacing it was not asked for."""


def check_output_dir(out_dir: str | os.PathLike, replace: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise OutputExistsError(f"output directory {out_dir} already exists; choose another output directory "
                                "or replace it (--force)")
    return out_dir


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[list[int]]:
    """While writing, SIGTERM raises SystemExit and Ctrl-C KeyboardInterrupt (when Python's default handler
    is installed), so `finally` blocks remove the partial directory; yields the signals received. A signal
    that lands inside a C extension (safetensors' `get_tensor`) can surface as that extension's own error,
    so the caller asks the list, not the exception's type, whether the run was interrupted."""
    received: list[int] = []

    def interrupt(signum, frame):  # noqa: ARG001
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM or signal.getsignal(sig) is signal.default_int_handler:
                previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _usual_permissions(directory: Path) -> None:
    """mkdtemp creates 0o700; give the published tree the modes mkdir/open would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def resumable_partial_dir(out_dir: str | os.PathLike) -> Path:
    """The hidden partial directory of a resumable write to `out_dir` (one fixed name, found again)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, replace: bool = False, partial: Path | None = None,
                     keep_on_interrupt: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield a hidden partial directory next to `out_dir`; it becomes `out_dir` only if the block succeeds.
    An existing `out_dir` is refused unless `replace`, and then replaced only at the very end (it survives
    a failed run). After a SIGKILL `.NAME.<random>.partial` stays, which never looks like a checkpoint.

    `partial`: use this directory (created if missing, e.g. `resumable_partial_dir`) instead of a random one.
    `keep_on_interrupt`: on SIGTERM / Ctrl-C the partial directory stays when it returns True (a journaled
    run that `--resume` can continue); errors always remove it."""
    out_dir = check_output_dir(out_dir, replace)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if partial is None:
        partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=PARTIAL_SUFFIX, dir=out_dir.parent))
    else:
        partial.mkdir(mode=0o700, exist_ok=True)
    received: list[int] = []
    try:
        with _signals_as_exceptions() as received:
            yield partial
            _usual_permissions(partial)
            if out_dir.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
                out_dir.rename(trash / "old")
                partial.rename(out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                partial.rename(out_dir)
    except BaseException as error:
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit)) or bool(received)
        if not interrupted:
            raise
        if keep_on_interrupt is not None and keep_on_interrupt():
            partial = None  # left for --resume
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        # the signal surfaced as another error (see _signals_as_exceptions): report it as what it was
        raise (KeyboardInterrupt() if received[0] == signal.SIGINT else SystemExit(128 + received[0])) from error
    finally:
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {model_dir} is not a Hugging Face checkpoint directory")
    return json.loads(path.read_text(encoding="utf-8"))


def write_config(out_dir: str | os.PathLike, config: dict) -> None:
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files (config.json and indexes excluded)."""
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if (not path.is_file() or path.name in ("config.json", INDEX_FILE)
                or path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")):
            continue
        shutil.copy2(path, Path(dst_dir) / path.name)
        copied.append(path.name)
    return copied


def write_checkpoint(out_dir: str | os.PathLike, config: dict, tensors: Iterable[tuple[str, "torch.Tensor"]], *,
                     side_files_from: str | os.PathLike | None = None, replace: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A plain Hugging Face checkpoint, atomically: the `(name, tensor)` pairs (spilled as they come),
    config.json and the side files of `side_files_from`."""
    with atomic_directory(out_dir, replace=replace) as partial:
        writer = ShardedSafetensorsWriter(partial, max_shard_bytes=max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.finish()
        write_config(partial, config)
        if side_files_from is not None:
            copy_side_files(side_files_from, partial)
    return Path(out_dir)
