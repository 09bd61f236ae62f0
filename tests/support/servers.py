"""Session-wide vLLM servers: each distinct server is started once and shared by the test files.

A vLLM server on CPU holds about 1.9 GB here (RSS with the engine in one process, below: API server
0.8, engine core 1.1; each imports torch) even with a small KV cache, so a whole suite's servers kept to the end would exhaust a 24 GiB machine
(CI once failed that way: the demo's servers could not start). At the start of every test module the
least recently used servers beyond `SERVERS_KEPT` are stopped; a module that needs one again restarts
it. Fixtures that hand out servers are therefore module-scoped.

Test servers run the model inside vLLM's engine-core process (`server_options_for_tests`), not in a third
worker process: see ENGINE_IN_ONE_PROCESS.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import pytest

from serve.launch import ServerOptions, VLLMServer

logger = logging.getLogger(__name__)

# Servers kept running from one test module to the next (override: MOESVD_TEST_SERVERS_KEPT).
SERVERS_KEPT = int(os.environ.get("MOESVD_TEST_SERVERS_KEPT", "4"))
# KV cache of a test server: the fixtures are tiny (hidden <= 256, <= 4 layers, 512-token prompts),
# so 256 MiB holds hundreds of thousands of tokens; vLLM-CPU's default is a whole GiB per server.
TEST_KV_CACHE_BYTES = 256 * 2**20
# vLLM's single-process executor (`--distributed-executor-backend uni`; vLLM-CPU accepts it only with
# VLLM_ENABLE_V1_MULTIPROCESSING=0, which the OpenAI server's AsyncLLM ignores: the engine core still runs
# in its own process): the worker - the same CPUWorker, model runner and plugin code - lives in the engine
# core, so a start imports torch and vLLM twice instead of three times. Measured here, alternating under
# the same load: 55 s against 96 s. What users run (the `mp` executor, a worker process with OpenMP
# binding) stays covered where the layout matters: tensor parallelism (tests/test_plugin_tp.py), the
# launcher's failure handling (tests/test_launch.py), the A/B CLI and monitoring servers that `serve/`
# starts itself, and the main command.
ENGINE_IN_ONE_PROCESS = {"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                         "extra_args": ["--distributed-executor-backend", "uni"]}


def server_options_for_tests(model_dir, *, worker_process: bool = False, **kwargs) -> ServerOptions:
    """ServerOptions of a test server: float32, eager, a small KV cache and, unless `worker_process`
    asks for vLLM's default layout (or tensor parallelism needs it), the engine in one process."""
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("kv_cache_bytes", TEST_KV_CACHE_BYTES)
    extra_args = list(kwargs.pop("extra_args", []))
    env = dict(kwargs.pop("env", {}))
    parallel = any(arg.startswith(("--tensor-parallel", "-tp", "--data-parallel", "--pipeline-parallel"))
                   for arg in extra_args)
    if not worker_process and not parallel:
        env = {**ENGINE_IN_ONE_PROCESS["env"], **env}
        extra_args += ENGINE_IN_ONE_PROCESS["extra_args"]
    return ServerOptions(model=str(model_dir), env=env, extra_args=extra_args, **kwargs)


class SessionServers:
    """`servers(model_dir, dtype="float32", enforce_eager=True, ...)` -> a running server.

    Servers with identical options are started once and shared; tests must not change a server's
    state. Starting one costs 40-80 s on 2 cores.
    """

    def __init__(self) -> None:
        self.running: OrderedDict[tuple, VLLMServer] = OrderedDict()  # least recently used first

    def __call__(self, model_dir, **kwargs) -> VLLMServer:
        key = (str(model_dir),) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in self.running:
            self.running[key] = VLLMServer(server_options_for_tests(model_dir, **kwargs)).start()
        self.running.move_to_end(key)
        return self.running[key]

    def trim(self, keep: int) -> None:
        """Stop the least recently used servers until at most `keep` run."""
        while len(self.running) > keep:
            _, server = self.running.popitem(last=False)
            logger.info("stopping session server %s (least recently used)", server.name)
            server.stop()

    def stop_all(self) -> None:
        self.trim(0)


@pytest.fixture(scope="session")
def vllm_server():
    servers = SessionServers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module", autouse=True)
def _bound_session_servers(vllm_server):
    """Before each module: stop the session's least recently used servers beyond SERVERS_KEPT."""
    vllm_server.trim(SERVERS_KEPT)
