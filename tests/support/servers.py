"""Session-wide vLLM servers: each distinct server is started once and shared by every test file."""

from __future__ import annotations

import logging
from typing import Callable

import pytest

from serve.launch import ServerOptions, VLLMServer

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def vllm_server() -> Callable[..., VLLMServer]:
    """Factory: `vllm_server(model_dir, dtype="float32", enforce_eager=True, ...)` -> a running server.

    Servers with identical options are started once per session and stopped at the end. Starting one
    costs 40-80 s on 2 cores, so tests share them; tests must not change a server's state.
    """
    running: dict[tuple, VLLMServer] = {}

    def get(model_dir, **kwargs) -> VLLMServer:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("enforce_eager", True)
        key = (str(model_dir),) + tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in running:
            server = VLLMServer(ServerOptions(model=str(model_dir), **kwargs))
            running[key] = server.start()
        return running[key]

    yield get
    for server in running.values():
        server.stop()
