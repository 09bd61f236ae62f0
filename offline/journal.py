"""Resumable compression: a journal of finished layers next to the hidden partial output.

    .OUT.partial/   the format writer's partial checkpoint (shards and spill files, never config.json or
                    an index before the end: it never looks like a checkpoint)
    .OUT.journal/   journal.jsonl: a header (what is compressed, how) and one line per finished stage or
                    layer: the sensitivity measurements, each layer's spec, report row and the writer's
                    state after it; stream-LLLL-rankR.pt: the hidden states after layer LLLL of rank R's
                    calibration windows (the inputs of the next layer)

A line is appended (and fsynced) only when everything it refers to is on disk, so after a kill (SIGKILL
included) `--resume` returns the writer to the last line's state and continues at the next layer with the
saved hidden states: the same checkpoint as an uninterrupted run. A resume whose input checkpoint, options,
calibration tokens or process count differ from the header's is refused, naming what changed. Both
directories go when the checkpoint is published; an error removes them; SIGTERM or Ctrl-C keeps them
once a layer is journaled (`--resume` continues, `--force` starts over).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.directories import resumable_partial_dir
from moesvd_vllm.format.safetensors_io import weight_files
from offline.distributed import Ranks

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
VERSION = 1


class ResumeError(MoESVDError):
    """A killed compression cannot be resumed as asked, or a new one would overwrite a resumable one."""


def journal_dir(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.journal"


def _file_identity(path: Path) -> dict[str, Any]:
    """Size, modification time and the sha256 of the first MiB (a safetensors file's header and more)."""
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def input_fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies the input checkpoint without reading all of it: config.json and every weight file."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json", *weight_files(model_dir)]
    return {p.name: _file_identity(p) for p in files}


def run_fingerprint(model_dir: str | os.PathLike, options, calibration, world_size: int,
                    device: torch.device) -> dict[str, Any]:
    """The header: a resume must agree with every key."""
    recorded = dict(options.recorded(), max_shard_bytes=options.max_shard_bytes)
    return {"version": VERSION, "input": input_fingerprint(model_dir), "options": recorded,
            "calibration": asdict(calibration), "world_size": world_size, "device": device.type}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            out += [f"{key}.{d}" for d in _differences(old[key], new[key])]
        else:
            out.append(f"{key} ({old.get(key)!r} then, {new.get(key)!r} now)")
    return out


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The journal's lines; a last line cut short by the kill is dropped (it was never complete)."""
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1 and any(rest.strip() for rest in lines[number + 1:]):
                raise ResumeError(f"{path}: line {number + 1} is damaged; start over with --force") from None
    return records


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C and SIGTERM while a journal line is written and recorded, then deliver them.

    Interrupted in between, the file would hold a finished layer that the run's records lack, and the
    interrupt handler (which keeps the partial output only when a layer is recorded) would delete it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in held:  # through the restored handlers (KeyboardInterrupt, SystemExit, or ignored)
            signal.raise_signal(sig)


class Journal:
    """The journal of one compression (rank 0 writes the lines; every rank saves its hidden states)."""

    def __init__(self, out_dir: Path, ranks: Ranks, records: list[dict[str, Any]]):
        self.out_dir, self.ranks = out_dir, ranks
        self.directory = journal_dir(out_dir)
        self.records = records

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, out_dir: str | os.PathLike, header: dict[str, Any], ranks: Ranks, *, resume: bool,
             force: bool) -> Journal:
        """A new journal, or with `resume` the killed run's (checked against `header`); the same answer,
        or the same error, on every rank."""
        out_dir = Path(out_dir)
        answer = cls._open_on_writer(out_dir, header, resume, force) if ranks.is_writer else None
        answer = ranks.broadcast_object(answer)
        if "error" in answer:
            raise ResumeError(answer["error"])
        journal = cls(out_dir, ranks, answer["records"])
        journal.directory.mkdir(exist_ok=True)  # other nodes: their own hidden states go here
        return journal

    @staticmethod
    def _open_on_writer(out_dir: Path, header: dict[str, Any], resume: bool, force: bool) -> dict[str, Any]:
        directory, partial = journal_dir(out_dir), resumable_partial_dir(out_dir)
        path = directory / JOURNAL_FILE
        left = [p for p in (directory, partial) if p.exists()]
        if not resume:
            if left and not force:
                return {"error": f"a killed compression into {out_dir} left {', '.join(map(str, left))}: "
                                 "continue it with --resume, or start over with --force"}
            for p in left:
                shutil.rmtree(p)
            directory.mkdir(parents=True)
            Journal._append_line(path, {"kind": "header", **header})
            return {"records": []}
        if not path.exists():
            return {"error": f"nothing to resume for {out_dir}: no journal {path}; run without --resume"}
        try:
            records = _read_records(path)
        except ResumeError as exc:
            return {"error": str(exc)}
        if not records or records[0].get("kind") != "header":
            return {"error": f"{path} has no header; start over with --force"}
        if any("writer" in r for r in records) and not partial.exists():
            return {"error": f"{path} records written layers but their partial output {partial} is gone; start "
                             "over with --force"}
        old = {k: v for k, v in records[0].items() if k != "kind"}
        changed = _differences(old, header)
        if changed:
            return {"error": f"--resume refused: the killed compression into {out_dir} ran with a different "
                             f"{'; '.join(changed[:6])}. Resume with the same input, options and process "
                             "count, or start over with --force"}
        return {"records": records[1:]}

    @staticmethod
    def _append_line(path: Path, record: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ----------------------------------------------------------------------------------- records
    def append(self, record: dict[str, Any]) -> None:
        """Record a finished stage or layer (rank 0; all ranks keep the record)."""
        with _interrupts_held():
            if self.ranks.is_writer:
                self._append_line(self.directory / JOURNAL_FILE, record)
            self.records.append(record)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def writer_state(self) -> dict[str, Any] | None:
        """The writer's state after the last journaled layer (for `CompressedCheckpointWriter`)."""
        layers = [r for r in self.records if "writer" in r]
        if not layers:
            return None
        return {"shards": layers[-1]["writer"]["shards"],
                "added": [entry for r in layers for entry in r["writer"]["added"]]}

    # ----------------------------------------------------------------------------------- finished layers
    def finish_layer(self, kind: str, index: int, data: dict[str, Any], hidden: list[torch.Tensor] | None,
                     writer=None) -> None:
        """Record layer `index` of the pass `kind` as finished: every rank's hidden states after it (when a
        later layer needs them) and the writer's state are on disk before its line; older hidden states of
        the pass go once the line is."""
        if hidden is not None:
            self.save_stream(kind, index, hidden)
        self.ranks.barrier()
        if writer is not None:
            data = dict(data, writer=writer.commit())
        self.append({"kind": kind, "layer": index, **data})
        self.ranks.barrier()
        if writer is not None:
            writer.release()
        self.drop_streams(kind, keep=index if hidden is not None else None)

    def resume_point(self, kind: str, device: torch.device, num_layers: int
                     ) -> tuple[list[dict[str, Any]], int, list[torch.Tensor] | None]:
        """(the pass's finished layer records, the first layer to run, the hidden states it takes, None
        when nothing is finished or nothing is left to run)."""
        finished = self.of_kind(kind)
        if not finished:
            return [], 0, None
        last = finished[-1]["layer"]
        hidden = self.load_stream(kind, last, device) if self._stream_path(kind, last).exists() else None
        if hidden is None and last + 1 < num_layers and finished[-1].get("needs_stream", True):
            raise ResumeError(f"{self._stream_path(kind, last)} is missing: the journal cannot be continued; "
                              "start over with --force")
        logger.info("%s: resuming at layer %d (layers 0-%d are journaled)", kind, last + 1, last)
        return finished, last + 1, hidden

    # ----------------------------------------------------------------------------------- hidden states
    def _stream_path(self, kind: str, layer: int) -> Path:
        return self.directory / f"{kind}-{layer:04d}-rank{self.ranks.rank}.pt"

    def save_stream(self, kind: str, layer: int, hidden: list[torch.Tensor]) -> None:
        """This rank's hidden states after `layer`, durable (written to a temporary name, then renamed)."""
        path = self._stream_path(kind, layer)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save([h.cpu() for h in hidden], f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)

    def load_stream(self, kind: str, layer: int, device: torch.device) -> list[torch.Tensor]:
        path = self._stream_path(kind, layer)
        return [h.to(device) for h in torch.load(path, map_location="cpu", weights_only=True)]

    def drop_streams(self, kind: str | None, keep: int | None = None) -> None:
        """This rank's saved hidden states of the pass `kind` (every pass: None) but those after `keep`."""
        kept = self._stream_path(kind, keep).name if kind is not None and keep is not None else None
        for path in self.directory.glob(f"{kind or '*'}-*-rank{self.ranks.rank}.*"):
            if path.name != kept:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """After the checkpoint is published (or an error): the journal and the hidden states go."""
        self.drop_streams(None)
        if self.ranks.is_writer:
            shutil.rmtree(self.directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------ records
def sensitivity_measurements(measured) -> dict[str, Any]:
    """One MoE layer's sensitivity measurements (pipeline.LayerSensitivity) for a journal line (float64
    values survive JSON exactly)."""
    return {"score": measured.score, "frequency": measured.frequency.tolist(),
            "principal_rank": measured.principal_rank.tolist(), "outlier_ratio": measured.outlier_ratio.tolist()}


def sensitivity_from_measurements(data: dict[str, Any], make):
    """`sensitivity_measurements` back, built by `make(score, frequency, principal_rank, outlier_ratio)`."""
    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return make(data["score"], tensor(data["frequency"]), tensor(data["principal_rank"]),
                tensor(data["outlier_ratio"]))
