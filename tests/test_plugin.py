"""The moesvd vLLM plugin, against real vLLM OpenAI servers on loopback.

* Exactness: a full-rank compressed checkpoint (random orthogonal bases, a 3-bank layer, a layer left
  dense) served by the plugin equals its dense twin served by stock vLLM: same greedy tokens, prompt and
  generated logprobs within float32 rounding (SAFETY x the model's float32 noise measured against its
  float64 evaluation, tests/support/tolerance.py: ~1e-4). The same comparison fails for a checkpoint
  with a transposed basis, so it does detect wiring errors.
* Checkpoints written by `moesvd compress` (U-trimming banks included) served by the plugin equal the
  PyTorch reference (offline.reference): same greedy tokens, logprobs within float32 rounding (the same).
* /metrics carries the moesvd_* compression series beside vLLM's own; a dense model says "not compressed".
* Failures are loud: without the plugin vLLM refuses the architecture; a truncated shard, a missing
  tensor, a wrong rank, an unknown format version or the per_expert form stop the server at startup with
  an error naming the layer/tensor, and no server comes up.
* `moesvd serve` starts a server, prints its URL, and stops it cleanly on Ctrl-C.
bf16, torch.compile, the bundled trained model and compressed Mixtral are `slow` (`-m slow`).
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moesvd_vllm.format.schema import read_moe_svd_config
from serve.http import get_text, metric_value, parse_metrics
from serve.launch import ServerOptions, ServerStartError, VLLMServer, free_port
from tests.support.plugin import (
    max_logprob_difference,
    prompt_token_ids,
    reference_score,
    same_greedy_tokens,
    score,
)
from tests.support.tolerance import served_logprob_tolerance

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CALIB = REPO / "offline" / "bundled" / "kjv_text" / "validation.txt"
WRONG_MODEL_FACTOR = 100  # a wiring error moves some logprob by 100x the exactness tolerance at least


def _float32_tolerance(model_dir: Path, prompts: list[list[int]], scores) -> float:
    """Two float32 evaluations of the model in `model_dir` on `prompts` (+ the greedy continuations in
    `scores`): SAFETY x its float32 noise against float64 (tests/support/tolerance.py)."""
    return served_logprob_tolerance(model_dir, [ids + s.tokens for ids, s in zip(prompts, scores)])


def _serve(model_dir: Path, **options) -> VLLMServer:
    options.setdefault("dtype", "float32")
    options.setdefault("enforce_eager", True)
    return VLLMServer(ServerOptions(model=str(model_dir), **options))


@pytest.fixture(scope="module")
def full_rank_scores(plugin_checkpoint):
    """Factory: arch -> (scores of the plugin-served full-rank checkpoint, scores of stock vLLM on its
    dense twin); each pair is served once per module, one server at a time."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            compressed = plugin_checkpoint("full_rank", arch)
            dense = plugin_checkpoint("expanded_dense", arch)
            prompts = prompt_token_ids(dense)
            with _serve(compressed) as server:
                logger.info("plugin %s full-rank: ready after %.0f s", arch, server.startup_seconds)
                compressed_scores = score(server, prompts)
            with _serve(dense) as server:
                logger.info("stock %s expanded dense: ready after %.0f s", arch, server.startup_seconds)
                dense_scores = score(server, prompts)
            cache[arch] = compressed_scores, dense_scores
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_full_rank_checkpoint_served_exactly(full_rank_scores, plugin_checkpoint, arch):
    compressed, dense = full_rank_scores(arch)
    difference = max_logprob_difference(compressed, dense)
    twin = plugin_checkpoint("expanded_dense", arch)
    tolerance = _float32_tolerance(twin, prompt_token_ids(twin), dense)
    logger.info("%s: plugin full-rank vs stock dense twin: max |logprob diff| %.2e (tolerance %.2e)", arch,
                difference, tolerance)
    assert same_greedy_tokens(compressed, dense)
    assert difference <= tolerance


def test_wrong_basis_is_detected(full_rank_scores, plugin_checkpoint):
    """The exactness comparison is sensitive: a transposed input basis (loads fine) fails it."""
    _, dense = full_rank_scores("qwen3_moe")
    wrong = plugin_checkpoint("transposed_basis", "qwen3_moe")
    with _serve(wrong) as server:
        wrong_scores = score(server, prompt_token_ids(wrong))
    difference = max_logprob_difference(wrong_scores, dense)
    twin = plugin_checkpoint("expanded_dense", "qwen3_moe")
    tolerance = _float32_tolerance(twin, prompt_token_ids(twin), dense)
    logger.info("transposed basis vs dense twin: max |logprob diff| %.2e (exactness tolerance %.2e)",
                difference, tolerance)
    assert difference > WRONG_MODEL_FACTOR * tolerance


# ----------------------------------------------------------- checkpoints written by `moesvd compress`

# qwen3_moe: the paper's method with neuron selection (U-trimming into 2 banks, 64 of 128 neurons kept,
# rank 32 < H = 128 with bases); mixtral: the default method in steps of 8 neurons (neuron selection only:
# 80-88 of 128 neurons, no bases, sizes the x86 kernel pads to 96). Ratios the fixtures can reach.
COMPRESS_OPTIONS = {
    "qwen3_moe": dict(method="moe-svd", ratio=0.5, ratio_tolerance=0.05, min_intermediate_fraction=0.5),
    "mixtral": dict(method="moe-svd-stacked", ratio=0.35, ratio_tolerance=0.05, intermediate_step=8),
}


@pytest.fixture(scope="module")
def compressed_by_moesvd(tiny_model_dir, tmp_path_factory):
    """Factory: arch -> `moesvd compress` output with COMPRESS_OPTIONS[arch] (small calibration)."""
    from offline.compress import CompressionOptions, compress

    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            options = CompressionOptions(calib=str(CALIB), num_samples=8, seq_len=32, batch_size=4,
                                         **COMPRESS_OPTIONS[arch])
            built[arch] = compress(tiny_model_dir(arch), tmp_path_factory.mktemp("compressed") / arch,
                                   options)
        return built[arch]

    return get


def _compare_with_reference(model_dir: Path, server: VLLMServer) -> tuple[float, float]:
    """(max |logprob difference| plugin vs the float32 reference, its float32 tolerance)."""
    from offline.reference import load_reference_model

    prompts = prompt_token_ids(model_dir)
    served = score(server, prompts)
    reference = reference_score(load_reference_model(model_dir, dtype="float32").eval(), prompts)
    assert same_greedy_tokens(served, reference)
    return max_logprob_difference(served, reference), _float32_tolerance(model_dir, prompts, reference)


@pytest.fixture(scope="module")
def compressed_qwen_server(compressed_by_moesvd):
    model_dir = compressed_by_moesvd("qwen3_moe")
    with _serve(model_dir) as server:
        yield model_dir, server


def test_compressed_qwen3_moe_matches_reference(compressed_qwen_server):
    model_dir, server = compressed_qwen_server
    config = read_moe_svd_config(model_dir)
    assert any(spec.num_banks < spec.num_experts for spec in config.layers.values()), \
        "the moe-svd method should have trimmed experts into banks"
    assert all(spec.intermediate == 64 and spec.bases and spec.rank < 128 for spec in config.layers.values())
    difference, tolerance = _compare_with_reference(model_dir, server)
    logger.info("compressed qwen3_moe: plugin vs reference max |logprob diff| %.2e (tolerance %.2e)",
                difference, tolerance)
    assert difference <= tolerance


def test_compressed_mixtral_matches_reference(compressed_by_moesvd):
    """The default method's layers without bases (plain fused MoE with fewer neurons) served exactly."""
    model_dir = compressed_by_moesvd("mixtral")
    config = read_moe_svd_config(model_dir)
    assert all(not spec.bases and spec.intermediate < 128 for spec in config.layers.values())
    assert any(spec.intermediate % 16 for spec in config.layers.values())
    with _serve(model_dir) as server:
        difference, tolerance = _compare_with_reference(model_dir, server)
    logger.info("compressed mixtral: plugin vs reference max |logprob diff| %.2e (tolerance %.2e)",
                difference, tolerance)
    assert difference <= tolerance


# ------------------------------------------------------------------------------------------ /metrics

def test_metrics_export_compression(compressed_qwen_server):
    model_dir, server = compressed_qwen_server
    config = read_moe_svd_config(model_dir)
    score(server, prompt_token_ids(model_dir)[:1])
    samples = parse_metrics(get_text(server.url("/metrics")))
    name = server.name
    assert metric_value(samples, "moesvd_compression_info", model_name=name, compressed="true",
                        method=config.method, format_version=str(config.format_version)) == 1
    assert metric_value(samples, "moesvd_expert_parameters", model_name=name,
                        variant="dense") == config.params.expert_dense
    assert metric_value(samples, "moesvd_expert_parameters", model_name=name,
                        variant="compressed") == config.params.expert_compressed
    assert metric_value(samples, "moesvd_expert_compression_ratio",
                        model_name=name) == pytest.approx(config.params.ratio)
    assert metric_value(samples, "moesvd_decomposed_layers", model_name=name) == len(config.layers)
    # vLLM's own series are still there, under the same model_name
    assert metric_value(samples, "vllm:prompt_tokens_total", model_name=name) > 0


def test_metrics_of_a_dense_model_say_not_compressed(tiny_model_dir, vllm_server):
    server = vllm_server(tiny_model_dir("qwen3_moe"))  # the stock server other tests share
    samples = parse_metrics(get_text(server.url("/metrics")))
    assert metric_value(samples, "moesvd_compression_info", model_name=server.name, compressed="false",
                        method="none") == 1
    assert not any(name.startswith("moesvd_expert") for name, _ in samples)


# ------------------------------------------------------------------------------------ loud failures

def _start_fails(model_dir: Path, **options) -> str:
    server = _serve(model_dir, **options)
    with pytest.raises(ServerStartError) as failure:
        server.start()
    assert server.process is None  # stopped: nothing left serving
    return str(failure.value)


def test_without_the_plugin_vllm_refuses_the_architecture(plugin_checkpoint):
    message = _start_fails(plugin_checkpoint("full_rank"), env={"VLLM_PLUGINS": ""})
    assert "MoESVDQwen3MoeForCausalLM" in message
    assert "not supported" in message


@pytest.mark.parametrize("kind, expected", [
    ("missing_tensor", ["decoder layer 1", "model.layers.1.mlp.experts.2.", "missing"]),
    ("wrong_rank", ["decoder layer 2", "tensor model.layers.2.mlp.", "rank 96"]),
    ("unknown_version", ["format_version", "99"]),
    ("truncated_shard", ["truncated"]),
    ("per_expert", ["per_expert", "shared_basis"]),
])
def test_broken_checkpoints_fail_at_startup(plugin_checkpoint, kind, expected):
    message = _start_fails(plugin_checkpoint(kind))
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in the startup error:\n{message}"


# --------------------------------------------------------------------------------------- moesvd serve

def test_moesvd_serve_runs_in_foreground_and_stops_on_ctrl_c(plugin_checkpoint, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "moesvd_vllm.cli", "serve", str(plugin_checkpoint("full_rank")),
               "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--log-file", str(tmp_path / "vllm.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "Press Ctrl-C to stop" in line or process.poll() is not None:
                break
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in output, output
        assert "compressed checkpoint" in output
        models = get_text(f"http://127.0.0.1:{port}/v1/models")
        assert "full_rank" in models
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(OSError):
        get_text(f"http://127.0.0.1:{port}/health", timeout=5)


# --------------------------------------------------------------------------------- slow: bf16, compile

def _mean_prompt_logprob_difference(a, b) -> float:
    differences = [abs(u - v) for x, y in zip(a, b, strict=True)
                   for u, v in zip(x.prompt_logprobs, y.prompt_logprobs, strict=True)]
    return sum(differences) / len(differences)


@pytest.mark.slow
def test_bfloat16_with_float32_bases_is_as_close_as_stock_bfloat16(full_rank_scores, plugin_checkpoint):
    """bf16 (float32 bases kept) vs the float32 dense twin: no further off than stock vLLM's own bf16.

    The sharpened random fixture is chaotic in bf16 (even PyTorch bf16 vs float32 differs by several
    nats on some tokens and flips greedy tokens), so the yardstick is stock vLLM in bf16 on the dense twin.
    """
    _, dense_float32 = full_rank_scores("qwen3_moe")
    prompts = prompt_token_ids(plugin_checkpoint("expanded_dense"))
    with _serve(plugin_checkpoint("full_rank"), dtype="bfloat16") as server:
        plugin_bf16 = score(server, prompts)
    with _serve(plugin_checkpoint("expanded_dense"), dtype="bfloat16") as server:
        stock_bf16 = score(server, prompts)
    plugin_error = _mean_prompt_logprob_difference(plugin_bf16, dense_float32)
    stock_error = _mean_prompt_logprob_difference(stock_bf16, dense_float32)
    logger.info("bf16 vs float32 dense: plugin mean |diff| %.4f (max %.3f), stock vLLM mean %.4f (max %.3f)",
                plugin_error, max_logprob_difference(plugin_bf16, dense_float32), stock_error,
                max_logprob_difference(stock_bf16, dense_float32))
    assert plugin_error <= 1.5 * stock_error + 0.01


@pytest.mark.slow
def test_torch_compile_full_rank_matches_dense(plugin_checkpoint):
    compressed, dense = plugin_checkpoint("full_rank"), plugin_checkpoint("expanded_dense")
    prompts = prompt_token_ids(dense)
    with _serve(compressed, enforce_eager=False) as server:
        logger.info("plugin full-rank with torch.compile: ready after %.0f s", server.startup_seconds)
        compiled = score(server, prompts)
    with _serve(dense) as server:
        eager_dense = score(server, prompts)
    difference = max_logprob_difference(compiled, eager_dense)
    tolerance = _float32_tolerance(dense, prompts, eager_dense)
    logger.info("torch.compile plugin vs eager stock dense twin: max |logprob diff| %.2e (tolerance %.2e)",
                difference, tolerance)
    assert same_greedy_tokens(compiled, eager_dense)
    assert difference <= tolerance


@pytest.mark.slow
def test_bundled_model_compressed_matches_reference(tmp_path):
    try:
        from offline.bundled import bundled_model_dir

        dense = bundled_model_dir()
    except (ImportError, FileNotFoundError) as error:
        pytest.fail(f"the bundled model is not available: {error}")
    from offline.compress import CompressionOptions, compress

    options = CompressionOptions(ratio=0.3, ratio_tolerance=0.05, calib=str(CALIB), num_samples=16,
                                 seq_len=128, batch_size=4)
    model_dir = compress(dense, tmp_path / "bundled-compressed", options)
    with _serve(model_dir) as server:
        difference, tolerance = _compare_with_reference(model_dir, server)
    logger.info("compressed bundled model: plugin vs reference max |logprob diff| %.2e (tolerance %.2e)",
                difference, tolerance)
    assert difference <= tolerance


# ------------------------------------------------- the load-time check inside the worker (no server)

def _stream_through_validator(model_dir: Path) -> None:
    """What the plugin's load_weights does: every tensor streams through the validator, then finish()."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from moesvd_vllm.layers import compression_config
    from moesvd_vllm.loading import CompressedCheckpointValidator
    from moesvd_vllm.architectures import moe_dims, moe_layer_indices

    hf_config = AutoConfig.from_pretrained(model_dir)
    config = hf_config.to_dict()
    validator = CompressedCheckpointValidator(config["model_type"], compression_config(hf_config),
                                              moe_dims(config), moe_layer_indices(config))
    for shard in sorted(model_dir.glob("*.safetensors")):
        for _ in validator.inspect(load_file(shard).items()):
            pass
    validator.finish()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_load_time_check_accepts_a_good_checkpoint(plugin_checkpoint, arch):
    _stream_through_validator(plugin_checkpoint("full_rank", arch))


@pytest.mark.parametrize("kind, expected", [
    ("missing_tensor", "decoder layer 1: tensor(s) model.layers.1.mlp.experts.2."),
    ("wrong_rank", "decoder layer 2, tensor model.layers.2.mlp."),
])
def test_load_time_check_rejects_a_broken_checkpoint(plugin_checkpoint, kind, expected):
    from moesvd_vllm.loading import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)):
        _stream_through_validator(plugin_checkpoint(kind))


def test_load_time_check_rejects_stale_dense_experts(plugin_checkpoint, tmp_path):
    """A tensor for expert 5 left in layer 1 (3 banks) is reported, not silently dropped by vLLM."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moesvd_vllm.loading import CheckpointMismatchError

    model_dir = shutil.copytree(plugin_checkpoint("full_rank"), tmp_path / "stale")
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.experts.5.gate_proj.weight"] = tensors["model.embed_tokens.weight"][:128].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="model.layers.1.mlp.experts.5.gate_proj.weight"):
        _stream_through_validator(model_dir)
