"""Fixtures for the A/B and monitoring tests: the arms, a failing peer and a real Prometheus.

- `ab_arms`: two running stock vLLM servers that share a tokenizer (the tiny qwen3_moe and mixtral
  fixtures; the same servers tests/test_vllm_serving_stock.py uses, so they cost no extra start-up).
- `full_rank_twin_server`: the plugin serving an exact full-rank compressed twin of arm A's model.
- `bundled_arms`: the bundled model, dense (stock vLLM) and compressed at 60 % (the plugin).
- `bundled_twin_server`: the plugin serving an exact full-rank compressed twin of the bundled model.
- `failing_peer(mode, ...)`: a small stdlib HTTP server that speaks enough of the OpenAI API to fail
  on purpose (HTTP 4xx/5xx, or dying after a few answers). It is the broken far end, not a stand-in
  for vLLM: every test that needs real model output uses a real vLLM server.
- `prometheus_server(config_dir)`: the Debian `prometheus` binary on a free loopback port, with its
  data in a temporary directory, stopped after the test.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from serve.launch import free_port

logger = logging.getLogger(__name__)

ARM_A_ARCH = "qwen3_moe"
ARM_B_ARCH = "mixtral"


@pytest.fixture(scope="module")
def ab_arms(tiny_model_dir, vllm_server):
    """(server A, server B): real vLLM servers of two different models with the same tokenizer."""
    return vllm_server(tiny_model_dir(ARM_A_ARCH)), vllm_server(tiny_model_dir(ARM_B_ARCH))


@pytest.fixture(scope="session")
def full_rank_twin_dir(tiny_model_dir, tmp_path_factory):
    """An exact full-rank compressed twin of arm A's dense tiny qwen3_moe (orthogonal bases)."""
    from offline.full_rank import write_full_rank_checkpoint

    return write_full_rank_checkpoint(tiny_model_dir(ARM_A_ARCH),
                                      tmp_path_factory.mktemp("ab_twin") / "qwen3_moe-full-rank",
                                      basis="orthogonal")


@pytest.fixture(scope="module")
def full_rank_twin_server(full_rank_twin_dir, vllm_server):
    """The plugin serving `full_rank_twin_dir`."""
    return vllm_server(full_rank_twin_dir)


BUNDLED_RATIO = 0.6  # the demo's ratio: shared bases of rank 96 in every layer


@pytest.fixture(scope="session")
def bundled_compressed_dir(tmp_path_factory):
    """The bundled model compressed at BUNDLED_RATIO with the default method (built once a session)."""
    from offline.bundled import bundled_model_dir, corpus_split_path
    from offline.compress import CompressionOptions, compress

    return compress(bundled_model_dir(), tmp_path_factory.mktemp("bundled") / "bundled-60", CompressionOptions(
        ratio=BUNDLED_RATIO, calib=str(corpus_split_path("train")), num_samples=64, seq_len=128))


@pytest.fixture(scope="module")
def bundled_arms(vllm_server, bundled_compressed_dir):
    """(dense server, compressed server) of the bundled model; the compressed one at BUNDLED_RATIO."""
    from offline.bundled import bundled_model_dir

    return vllm_server(bundled_model_dir()), vllm_server(bundled_compressed_dir)


@pytest.fixture(scope="session")
def bundled_twin_dir(tmp_path_factory):
    """The bundled model as an exact full-rank compressed twin (orthogonal bases)."""
    from offline.bundled import bundled_model_dir
    from offline.full_rank import write_full_rank_checkpoint

    return write_full_rank_checkpoint(bundled_model_dir(),
                                      tmp_path_factory.mktemp("bundled_twin") / "bundled-full-rank",
                                      basis="orthogonal")


@pytest.fixture(scope="module")
def bundled_twin_server(vllm_server, bundled_twin_dir):
    """The plugin serving `bundled_twin_dir`."""
    return vllm_server(bundled_twin_dir)


# ---------------------------------------------------------------- failing peer


class FailingPeer:
    """A loopback OpenAI-ish server that fails on purpose.

    modes:
      "http_error"  every /v1/completions answers `status` with an OpenAI-style error body;
      "die_after"   the first `ok_answers` completions stream `tokens` chunks, then the server closes
                    its socket and every later connection is refused (a server dying mid-run).
    /v1/models and /version always answer, so the A/B starts.
    """

    def __init__(self, mode: str, *, status: int = 500, ok_answers: int = 0, tokens: int = 4,
                 model: str = "failing-peer"):
        if mode not in ("http_error", "die_after"):
            raise ValueError(f"unknown failing-peer mode {mode!r}")
        self.mode, self.status, self.ok_answers, self.tokens, self.model = mode, status, ok_answers, tokens, model
        self.completions_seen = 0
        self.lock = threading.Lock()
        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.dead = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FailingPeer":
        self.thread.start()
        return self

    def die(self) -> None:
        if not self.dead:
            self.dead = True
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            self.server.server_close()

    def stop(self) -> None:
        if not self.dead:
            self.dead = True
            self.server.shutdown()
            self.server.server_close()

    def _handler(self):
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": peer.model, "object": "model"}]})
                elif self.path == "/version":
                    self._json(200, {"version": "failing-peer"})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}", "code": 404}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with peer.lock:
                    peer.completions_seen += 1
                    number = peer.completions_seen
                if peer.mode == "http_error":
                    self._json(peer.status, {"error": {"message": f"failing peer: HTTP {peer.status} on "
                                                                  "purpose", "type": "TestError",
                                                       "code": peer.status}})
                    return
                if number > peer.ok_answers:
                    peer.die()
                    self.close_connection = True
                    self.connection.close()
                    return
                if body.get("stream"):
                    self._stream()
                else:
                    self._json(200, {"choices": [{"text": " x" * peer.tokens, "index": 0}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": peer.tokens}})

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(peer.tokens):
                    self.wfile.write(b'data: {"choices": [{"index": 0, "text": " x"}]}\n\n')
                    self.wfile.flush()
                usage = {"prompt_tokens": 1, "completion_tokens": peer.tokens}
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        return Handler


@pytest.fixture
def failing_peer() -> Callable[..., FailingPeer]:
    """Factory: `failing_peer("http_error", status=500)` or `failing_peer("die_after", ok_answers=3)`."""
    peers: list[FailingPeer] = []

    def make(mode: str, **kwargs) -> FailingPeer:
        peer = FailingPeer(mode, **kwargs).start()
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


# ---------------------------------------------------------------- real Prometheus


class PrometheusServer:
    """The `prometheus` binary with `config_file`, on a free loopback port, data in `data_dir`."""

    def __init__(self, config_file: Path, data_dir: Path):
        self.config_file, self.data_dir = Path(config_file), Path(data_dir)
        self.port = free_port()
        self.log_path = self.data_dir.parent / "prometheus.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "PrometheusServer":
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("the `prometheus` binary is missing: run `.ci/install --dev` (installs the "
                               "Debian package `prometheus`)")
        command = [binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
                   f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s:.0f} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def prometheus_server(tmp_path) -> Callable[[Path], PrometheusServer]:
    """Factory: `prometheus_server(config_file)` -> a ready Prometheus; stopped after the test."""
    started: list[PrometheusServer] = []

    def start(config_file: Path) -> PrometheusServer:
        data_dir = tmp_path / f"prometheus-data-{len(started)}"
        server = PrometheusServer(config_file, data_dir).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------- an arm with another tokenizer


def _retokenized_copy(model_dir: Path, out_dir: Path, vocab_size: int = 300) -> Path:
    """A copy of a fixture checkpoint with a byte-level BPE of a smaller vocabulary (other merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from offline.bundled.corpus import read_documents

    shutil.copytree(model_dir, out_dir)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(read_documents("validation")[:40], trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="module")
def other_tokenizer_server(tiny_model_dir, vllm_server, tmp_path_factory):
    """A real vLLM server whose tokenizer differs from the `ab_arms` one.

    The bundled model (vocabulary 4096; the same server tests/test_bundled_model.py starts) when it is
    in the repository, else a copy of the tiny qwen3_moe fixture with a 300-token BPE.
    """
    try:
        from offline.bundled import bundled_model_dir

        return vllm_server(bundled_model_dir())
    except FileNotFoundError:
        out = tmp_path_factory.mktemp("retokenized") / "qwen3_moe-bpe300"
        return vllm_server(_retokenized_copy(tiny_model_dir(ARM_A_ARCH), out))
