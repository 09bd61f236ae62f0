"""Counts of routed and skipped (token, expert) pairs, from the workers to the API server's /metrics.

The fused-MoE methods (moesvd_vllm/skip_kernel.py) run in the worker processes; the stat logger
(moesvd_vllm/metrics.py) runs in the API-server process. The API server names a directory in
`MOESVD_SKIP_STATS_DIR` when it loads the stat-logger plugin (before vLLM spawns the engine, whose
processes inherit it); each worker process keeps its two running totals in a 16-byte memory-mapped file
`<dir>/<pid>.counts` there (int64 routed, int64 skipped), and the stat logger sums the files. Pure
Python + numpy; a worker without the variable (offline `vllm.LLM` without the stat logger) only counts.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

STATS_DIR_ENV = "MOESVD_SKIP_STATS_DIR"
_SUFFIX = ".counts"


def ensure_stats_dir() -> Path:
    """The directory of this server's counts (created once, inherited by the processes spawned after)."""
    path = os.environ.get(STATS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="moesvd-skip-stats-")
        os.environ[STATS_DIR_ENV] = path
        atexit.register(shutil.rmtree, path, True)  # the process that made it (the API server) removes it
    return Path(path)


class PairCounter:
    """This process's totals (routed pairs, skipped pairs), mirrored into its counts file."""

    _instance: "PairCounter | None" = None

    def __init__(self) -> None:
        self.totals = np.zeros(2, dtype=np.int64)
        directory = os.environ.get(STATS_DIR_ENV)
        if directory and Path(directory).is_dir():
            path = Path(directory) / f"{os.getpid()}{_SUFFIX}"
            self.totals = np.memmap(path, dtype=np.int64, mode="w+", shape=(2,))

    @classmethod
    def get(cls) -> "PairCounter":
        if cls._instance is None or cls._instance._pid != os.getpid():
            cls._instance = cls()
            cls._instance._pid = os.getpid()
        return cls._instance

    def add(self, routed: int, skipped: int) -> None:
        self.totals[0] += routed
        self.totals[1] += skipped


def read_totals(directory: str | os.PathLike | None = None) -> tuple[int, int]:
    """(routed, skipped) pairs summed over the worker processes of this server."""
    directory = directory or os.environ.get(STATS_DIR_ENV)
    routed = skipped = 0
    if not directory or not Path(directory).is_dir():
        return 0, 0
    for path in Path(directory).glob(f"*{_SUFFIX}"):
        try:
            values = np.fromfile(path, dtype=np.int64, count=2)
        except OSError:
            continue
        if values.shape == (2,):
            routed += int(values[0])
            skipped += int(values[1])
    return routed, skipped
