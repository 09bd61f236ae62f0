"""The moesvd vLLM plugin, against real vLLM OpenAI servers on loopback.

* Exactness: a full-rank compressed checkpoint (random orthogonal bases, a 3-bank layer, a layer left
  dense) served by the plugin equals its dense twin served by stock vLLM: same greedy tokens, prompt and
  generated logprobs within 1e-4 (float32). The same comparison fails for a checkpoint with a
  transposed basis, so it does detect wiring errors.
* Checkpoints written by `moesvd compress` (U-trimming banks with bases for Qwen3-MoE, kept neurons
  without bases for Mixtral) served by the plugin equal the PyTorch reference (offline.reference): same
  greedy tokens, logprobs within 1e-3 (float32). Other architectures: tests/test_plugin_archs.py; tensor
  parallelism: tests/test_plugin_tp.py.
* /metrics carries the moesvd_* compression series beside vLLM's own; a dense model says "not compressed".
* Failures are loud: without the plugin vLLM refuses the architecture; a truncated shard, a missing
  tensor, a wrong rank, an unknown format version or the per_expert form stop the server at startup with
  an error naming the layer/tensor, and no server comes up; so does a NaN / Inf in a factor (at load).
* Format version 1 checkpoints pass the load-time and pre-flight checks (and serve: slow set).
* `moesvd serve` starts a server, prints its URL, and stops it cleanly on Ctrl-C.
bf16, torch.compile, the bundled trained model and full-rank Mixtral are `slow` (`-m slow`).
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
from serve.launch import ServerStartError, VLLMServer, free_port
from tests.support.plugin import (
    CALIB,
    float32_tolerance,
    max_logprob_difference,
    non_finite_tensor_name,
    prompt_token_ids,
    reference_difference,
    same_greedy_tokens,
    score,
    serve_options,
)
from tests.support.signals import default_sigint

logger = logging.getLogger(__name__)

WRONG_MODEL_MIN_DIFFERENCE = 1e-2  # a wiring error moves some logprob by far more (measured: 8 nats)


def _serve(model_dir: Path, **options) -> VLLMServer:
    return VLLMServer(serve_options(model_dir, **options))


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


@pytest.mark.parametrize("arch", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_full_rank_checkpoint_served_exactly(full_rank_scores, plugin_checkpoint, arch):
    compressed, dense = full_rank_scores(arch)
    difference = max_logprob_difference(compressed, dense)
    logger.info("%s: plugin full-rank vs stock dense twin: max |logprob diff| %.2e", arch, difference)
    assert same_greedy_tokens(compressed, dense)
    assert difference <= float32_tolerance(plugin_checkpoint("expanded_dense", arch), dense)


def test_wrong_basis_is_detected(full_rank_scores, plugin_checkpoint):
    """The exactness comparison is sensitive: a transposed input basis (loads fine) fails it."""
    _, dense = full_rank_scores("qwen3_moe")
    wrong = plugin_checkpoint("transposed_basis", "qwen3_moe")
    with _serve(wrong) as server:
        wrong_scores = score(server, prompt_token_ids(wrong))
    difference = max_logprob_difference(wrong_scores, dense)
    logger.info("transposed basis vs dense twin: max |logprob diff| %.2e", difference)
    assert difference > WRONG_MODEL_MIN_DIFFERENCE


# ----------------------------------------------------------- checkpoints written by `moesvd compress`

@pytest.fixture(scope="module")
def compressed_qwen_server(compressed_checkpoint, served_scores):
    """qwen3_moe compressed with the `banks` recipe, kept running for the /metrics test."""
    model_dir = compressed_checkpoint("qwen3_moe", "banks")
    with _serve(model_dir) as server:
        served_scores.record(model_dir, server)  # TP tests compare against these TP=1 scores
        yield model_dir, server


def test_compressed_qwen3_moe_matches_reference(compressed_qwen_server, served_scores):
    model_dir, server = compressed_qwen_server
    config = read_moe_svd_config(model_dir)
    assert any(spec.num_banks < spec.num_experts for spec in config.layers.values()), \
        "the moe-svd method should have trimmed experts into banks"
    assert all(spec.intermediate == 64 and spec.bases and spec.rank < 128 for spec in config.layers.values())
    served = served_scores(model_dir)
    difference = reference_difference(model_dir, served.scores)
    logger.info("compressed qwen3_moe: plugin vs reference max |logprob diff| %.2e (startup %.0f s)",
                difference, served.startup_seconds)
    assert difference <= float32_tolerance(model_dir, served.scores)


@pytest.mark.parametrize("recipe, groups, trimmed", [("groups", 4, False), ("d4", 2, True)])
def test_group_wise_bases_match_reference(compressed_checkpoint, served_scores, recipe, groups, trimmed):
    """Format version 4: every routed pair runs in its group's rank space (moesvd_vllm/grouped_bases.py),
    with U-trimming's banks inside the groups for D.4."""
    model_dir = compressed_checkpoint("qwen3_moe", recipe)
    config = read_moe_svd_config(model_dir)
    assert config.format_version == 4
    assert all(spec.basis_groups == groups and spec.bases for spec in config.layers.values())
    assert any(spec.num_banks < spec.num_experts for spec in config.layers.values()) == trimmed
    served = served_scores(model_dir)
    difference = reference_difference(model_dir, served.scores)
    logger.info("%s: plugin vs reference max |logprob diff| %.2e", recipe, difference)
    assert difference <= float32_tolerance(model_dir, served.scores)


def test_compressed_mixtral_matches_reference(compressed_checkpoint, served_scores):
    """The default method's layers without bases (plain fused MoE with fewer neurons) served exactly."""
    model_dir = compressed_checkpoint("mixtral", "neurons")
    config = read_moe_svd_config(model_dir)
    assert all(not spec.bases and spec.intermediate < 128 for spec in config.layers.values())
    assert any(spec.intermediate % 16 for spec in config.layers.values())
    served = served_scores(model_dir)
    difference = reference_difference(model_dir, served.scores)
    logger.info("compressed mixtral: plugin vs reference max |logprob diff| %.2e (startup %.0f s)",
                difference, served.startup_seconds)
    assert difference <= float32_tolerance(model_dir, served.scores)


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
    """The startup error and the server's whole log (what the user's terminal shows: an error raised in
    a worker is followed by the engine's own traceback, longer than the error's log tail)."""
    server = _serve(model_dir, **options)
    with pytest.raises(ServerStartError) as failure:
        server.start()
    assert server.process is None  # stopped: nothing left serving
    return f"{failure.value}\n{server.log_path.read_text(errors='replace')}"


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


def test_non_finite_weights_fail_at_load_naming_the_tensor(plugin_checkpoint):
    """A NaN / Inf in a factor passes every header check; the worker refuses it while loading."""
    model_dir = plugin_checkpoint("non_finite")
    message = _start_fails(model_dir)
    assert f"tensor {non_finite_tensor_name(model_dir)}: 1 NaN and 1 Inf" in message, message


# --------------------------------------------------------------------------------------- moesvd serve

def test_moesvd_serve_runs_in_foreground_and_stops_on_ctrl_c(plugin_checkpoint, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "moesvd_vllm.cli", "serve", str(plugin_checkpoint("full_rank")),
               "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--log-file", str(tmp_path / "vllm.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=default_sigint)
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
    logger.info("torch.compile plugin vs eager stock dense twin: max |logprob diff| %.2e", difference)
    assert same_greedy_tokens(compiled, eager_dense)
    assert difference <= float32_tolerance(dense, eager_dense)


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
        served = score(server, prompt_token_ids(model_dir))
    difference = reference_difference(model_dir, served)
    logger.info("compressed bundled model: plugin vs reference max |logprob diff| %.2e", difference)
    assert difference <= float32_tolerance(model_dir, served)


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


@pytest.mark.parametrize("kind, arch", [("full_rank", "qwen3_moe"), ("full_rank", "mixtral"),
                                        ("format_v1", "qwen3_moe")])
def test_load_time_check_accepts_a_good_checkpoint(plugin_checkpoint, kind, arch):
    _stream_through_validator(plugin_checkpoint(kind, arch))


def test_preflight_accepts_a_format_version_1_checkpoint(plugin_checkpoint):
    """Checkpoints written before format version 2 (no `intermediate` / `bases` keys) still pass."""
    from transformers import AutoConfig

    from moesvd_vllm.layers import compression_config
    from moesvd_vllm.preflight import check_checkpoint_files

    model_dir = plugin_checkpoint("format_v1")
    hf_config = AutoConfig.from_pretrained(model_dir)
    compression = compression_config(hf_config)
    assert compression.format_version == 1
    assert check_checkpoint_files(model_dir, hf_config, compression)


@pytest.mark.slow
def test_format_version_1_checkpoint_is_served_as_before(full_rank_scores, plugin_checkpoint):
    """A format-1 checkpoint (same tensors as its format-2 twin) serves the same numbers."""
    compressed, _ = full_rank_scores("qwen3_moe")
    model_dir = plugin_checkpoint("format_v1")
    with _serve(model_dir) as server:
        old = score(server, prompt_token_ids(model_dir))
    assert same_greedy_tokens(old, compressed)
    assert max_logprob_difference(old, compressed) == 0.0


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
