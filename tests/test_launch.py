"""serve/launch.py against real vLLM servers: the KV cache size reaches vLLM, and a server that dies
during start-up is reported with its root cause (not only the end of its log)."""

from __future__ import annotations

import pytest

from serve.launch import ServerOptions, ServerStartError, VLLMServer
from tests.support.servers import TEST_KV_CACHE_BYTES


def test_session_servers_get_the_small_kv_cache(vllm_server, tiny_model_dir):
    server = vllm_server(tiny_model_dir("qwen3_moe"))
    log = server.log_path.read_text(errors="replace")
    gib = TEST_KV_CACHE_BYTES / 2**30
    assert f"Explicitly set ({gib:.2f}/" in log, "vLLM did not report the requested KV cache size"


def test_a_server_failing_in_its_engine_core_is_reported_with_the_cause(tiny_model_dir, tmp_path):
    # More KV cache than any machine of this kind has: vLLM's CPU worker raises in the engine core, whose
    # traceback ends far above the last lines of the log.
    options = ServerOptions(model=str(tiny_model_dir("qwen3_moe")), dtype="float32", enforce_eager=True,
                            kv_cache_bytes=2**50, log_path=str(tmp_path / "server.log"))
    with pytest.raises(ServerStartError) as failure:
        VLLMServer(options).start()
    message = str(failure.value)
    assert "cause: ValueError: Available memory" in message, message[:2000]
    assert "kv-cache-memory-bytes" in message
