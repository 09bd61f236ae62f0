"""`moesvd recover` (offline/recover*.py): distillation of a compressed checkpoint toward its dense original.

* On a compressed tiny fixture, stage 1 lowers every decomposed block's output error and stage 2 the
  KL(teacher || student), measurably and bit-for-bit reproducibly; the output validates as a compressed
  checkpoint, keeps the input's moe_svd block (plus the recovery record) and copies every tensor it did
  not train.
* Bad input writes nothing and names the problem: a teacher of another architecture or shape, a
  compressed teacher, a COMPRESSED directory that is not ours, data shorter than a batch, data that is or
  contains the bundled test split; an interrupted run leaves nothing and the rerun succeeds.
* A recovered checkpoint of the bundled model served by vLLM equals the PyTorch reference.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.format.schema import read_moe_svd_config
from moesvd_vllm.format.validator import validate_checkpoint_files
from offline.recover import REPORT_FILE, RecoveryOptions, recover
from offline.recover_checks import RecoveryInputError
from offline.recover_data import RecoveryDataError
from tests.support.signals import default_sigint

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
KJV = REPO / "offline" / "bundled" / "kjv_text"
TRAIN, TEST = KJV / "train.txt", KJV / "test.txt"
REFERENCE_TOLERANCE = 1e-3  # plugin vs PyTorch reference, float32 (as tests/test_plugin.py)
MEASURABLE = 0.9  # "reduced measurably": at most 90 % of the error / KL before

TINY = dict(num_samples=8, eval_samples=4, seq_len=32, batch_size=4, stage1_steps=20,
            stage1_batch_tokens=128, stage2_steps=20, device="cpu")


def _options(teacher: Path, data: Path = TRAIN, **overrides) -> RecoveryOptions:
    return RecoveryOptions(teacher=str(teacher), data=str(data), **{**TINY, **overrides})


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def tiny_compressed(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(dense tiny qwen3_moe, its default-method compression at ~60 %: neurons kept and bases in every layer)."""
    from offline.compress import CompressionOptions, compress

    dense = tiny_model_dir("qwen3_moe")
    options = CompressionOptions(calib=str(KJV / "validation.txt"), num_samples=8, seq_len=32, batch_size=4,
                                 ratio=0.6, ratio_tolerance=0.05, intermediate_step=8)
    return dense, compress(dense, tmp_path_factory.mktemp("recover") / "compressed", options)


@pytest.fixture(scope="module")
def recovered_twice(tiny_compressed, tmp_path_factory) -> tuple[Path, Path]:
    dense, compressed = tiny_compressed
    root = tmp_path_factory.mktemp("recovered")
    return tuple(recover(compressed, root / name, _options(dense)) for name in ("a", "b"))


def test_stage1_reduces_every_block_error(recovered_twice):
    report = json.loads((recovered_twice[0] / REPORT_FILE).read_text())
    layers = report["stage1"]["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3]
    for r in layers:
        logger.info("layer %d: block error %.4g -> %.4g", r["layer"], r["error_before"], r["error_after"])
        assert r["error_after"] < MEASURABLE * r["error_before"]


def test_stage2_reduces_the_kl(recovered_twice):
    stage2 = json.loads((recovered_twice[0] / REPORT_FILE).read_text())["stage2"]
    logger.info("KL %.4g -> %.4g", stage2["kl_before"], stage2["kl_after"])
    assert stage2["kl_after"] < MEASURABLE * stage2["kl_before"]


def test_recovery_is_deterministic(recovered_twice):
    first, second = (_tensors(d) for d in recovered_twice)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_output_is_the_same_format_with_a_recovery_record(recovered_twice, tiny_compressed):
    _, compressed = tiny_compressed
    out = recovered_twice[0]
    before, after = read_moe_svd_config(compressed), read_moe_svd_config(out)
    config = json.loads((out / "config.json").read_text())
    validate_checkpoint_files(out, config, after)
    assert config["architectures"] == json.loads((compressed / "config.json").read_text())["architectures"]
    assert after.layers == before.layers and after.params == before.params and after.method == before.method
    record = after.options["recovery"]
    assert len(record) == 1 and record[0]["stage1"] and record[0]["stage2"]
    assert {k: v for k, v in after.options.items() if k != "recovery"} == before.options
    old, new = _tensors(compressed), _tensors(out)
    assert old.keys() == new.keys()
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert changed and all(".experts." in name or ".moe_svd_" in name for name in changed)
    assert all(old[name].dtype == new[name].dtype for name in old)


# ------------------------------------------------------------------------------------------ bad input
def _refused(error_type, compressed, out: Path, options: RecoveryOptions, *fragments: str) -> None:
    with pytest.raises(error_type) as failure:
        recover(compressed, out, options)
    message = str(failure.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_teacher_of_another_architecture_is_refused(tiny_compressed, tiny_model_dir, tmp_path):
    _, compressed = tiny_compressed
    _refused(RecoveryInputError, compressed, tmp_path / "out", _options(tiny_model_dir("mixtral")),
             "is not the model", "model_type 'mixtral'")


def test_teacher_of_another_shape_is_refused(tiny_compressed, tiny_model_dir, tmp_path):
    _, compressed = tiny_compressed
    _refused(RecoveryInputError, compressed, tmp_path / "out", _options(tiny_model_dir("qwen3_moe", num_layers=2)),
             "is not the model", "num_hidden_layers")


def test_compressed_teacher_is_refused(tiny_compressed, tmp_path):
    _, compressed = tiny_compressed
    _refused(RecoveryInputError, compressed, tmp_path / "out", _options(compressed), "itself a compressed")


def test_a_directory_that_is_not_ours_is_refused(tiny_compressed, tmp_path):
    dense, _ = tiny_compressed
    _refused(RecoveryInputError, dense, tmp_path / "out", _options(dense), "not a moesvd compressed checkpoint",
             "moe_svd")


def test_cli_reports_bad_input_cleanly(tiny_compressed, tmp_path, capsys):
    from moesvd_vllm.cli import main

    dense, _ = tiny_compressed
    out = tmp_path / "out"
    assert main(["recover", str(dense), "--teacher", str(dense), "--data", str(TRAIN), "--out", str(out)]) == 1
    assert "moesvd recover: error:" in capsys.readouterr().out
    assert not out.exists()


def test_data_shorter_than_a_batch_is_refused(tiny_compressed, tmp_path):
    dense, compressed = tiny_compressed
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n", encoding="utf-8")
    _refused(RecoveryDataError, compressed, tmp_path / "out", _options(dense, short), "shorter than one batch")


def test_the_test_split_is_refused(tiny_compressed, tmp_path):
    dense, compressed = tiny_compressed
    _refused(RecoveryDataError, compressed, tmp_path / "out", _options(dense, TEST), "held-out file", "SHA-256")


def test_data_containing_test_text_is_refused(tiny_compressed, tmp_path):
    dense, compressed = tiny_compressed
    chapter = TEST.read_text(encoding="utf-8").split("\n\n")[7]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(TRAIN.read_text(encoding="utf-8")[:200_000] + "\n\n" + chapter, encoding="utf-8")
    _refused(RecoveryDataError, compressed, tmp_path / "out", _options(dense, mixed), "contains held-out text")


def test_the_train_split_passes_the_overlap_check():
    """Formulaic verses recur across the corpus: the guard must not refuse the whole train split."""
    from offline.recover_data import bundled_test_split, find_overlap

    assert find_overlap([TRAIN.read_text(encoding="utf-8")], bundled_test_split()) is None


def _cli(compressed: Path, teacher: Path, out: Path, **overrides) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, **overrides}.items()]
    return [sys.executable, "-m", "moesvd_vllm.cli", "recover", str(compressed), "--teacher", str(teacher),
            "--data", str(TRAIN), "--out", str(out), *flags]


def test_interrupted_run_leaves_nothing_and_reruns(tiny_compressed, tmp_path):
    dense, compressed = tiny_compressed
    out = tmp_path / "out"
    process = subprocess.Popen(_cli(compressed, dense, out, stage1_steps=100_000), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    lines = []
    try:
        for line in process.stdout:  # wait until stage 1 trains, with the partial output directory open
            lines.append(line)
            if "stage 1:" in line:
                break
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "".join(lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) != 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    rerun = subprocess.run(_cli(compressed, dense, out, stage1_steps=2, stage2_steps=2), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (out / REPORT_FILE).is_file()


# ------------------------------------------------------------------------------------------ served
@pytest.mark.slow  # ~2 min (compress + recover the bundled model + a server); test_plugin.py serves compressed checkpoints exactly
def test_recovered_bundled_checkpoint_serves_like_the_reference(tmp_path_factory, vllm_server):
    from offline.bundled import bundled_model_dir
    from offline.compress import CompressionOptions, compress
    from offline.reference import load_reference_model
    from tests.support.plugin import max_logprob_difference, prompt_token_ids, reference_score, \
        same_greedy_tokens, score

    root = tmp_path_factory.mktemp("bundled_recovered")
    dense = bundled_model_dir()
    compressed = compress(dense, root / "compressed", CompressionOptions(
        calib=str(TRAIN), num_samples=16, seq_len=128, ratio=0.6, ratio_tolerance=0.02))
    out = recover(compressed, root / "recovered", RecoveryOptions(
        teacher=str(dense), data=str(TRAIN), num_samples=16, eval_samples=4, seq_len=128, stage1_steps=20,
        stage2_steps=10, device="cpu"))
    prompts = prompt_token_ids(out)
    served = score(vllm_server(out), prompts)
    reference = reference_score(load_reference_model(out, dtype="float32").eval(), prompts)
    difference = max_logprob_difference(served, reference)
    logger.info("recovered bundled checkpoint: plugin vs reference max |logprob diff| %.2e", difference)
    assert same_greedy_tokens(served, reference)
    assert difference <= REFERENCE_TOLERANCE
    # and recovery changed the model: the compressed input's reference differs from it
    before = reference_score(load_reference_model(compressed, dtype="float32").eval(), prompts)
    assert max_logprob_difference(before, reference) > 10 * REFERENCE_TOLERANCE


# ------------------------------------------------------------------------------------------ shared core
def _random_factors(num_experts=3, d_out=12, d_in=8, rank=2, seed=0):
    from offline.shared_core import ProjectionFactors

    g = torch.Generator().manual_seed(seed)
    return ProjectionFactors(*(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                               ((d_out, d_in), (num_experts, d_in, rank), (num_experts, d_in, rank),
                                (num_experts, d_out, rank), (num_experts, d_out, rank))))


def test_shared_core_weights_are_the_wrapped_core():
    f = _random_factors()
    eye_in, eye_out = torch.eye(8, dtype=torch.float64), torch.eye(12, dtype=torch.float64)
    for e in range(3):
        explicit = (eye_out + f.out_u[e] @ f.out_v[e].T) @ f.core @ (eye_in + f.in_u[e] @ f.in_v[e].T)
        torch.testing.assert_close(f.weights()[e], explicit, rtol=0, atol=1e-12)


def test_shared_core_experts_compute_their_dense_weights():
    """The reference module's forward equals routing over the dense experts it stands for."""
    from offline.reference import combine_selected_experts
    from offline.shared_core import SharedCoreExperts

    factors = {"gate": _random_factors(4, 6, 8, 2, 1), "up": _random_factors(4, 6, 8, 2, 2),
               "down": _random_factors(4, 8, 6, 2, 3)}
    module = SharedCoreExperts(factors, torch.nn.functional.silu, dtype=torch.float64)
    gate, up, down = module.dense_weights()
    x = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    index = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(5))
    weights = torch.rand(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def dense(e, rows):
        return (torch.nn.functional.silu(rows @ gate[e].T) * (rows @ up[e].T)) @ down[e].T

    expected = combine_selected_experts(x, index, weights, 4, 8, dense)
    # float64 through two different association orders of the same products: ~1e-13 relative
    torch.testing.assert_close(module(x, index, weights), expected, rtol=1e-10, atol=1e-10)


def test_shared_core_fit_improves_on_the_mean_core():
    """Experts = a common matrix + a rank-2 per-expert part: the rank-2 wrappers fit them far better than
    the mean (the zero-shot init), deterministically."""
    from offline.shared_core import FitSettings, fit_projection

    g = torch.Generator().manual_seed(0)
    common = torch.randn(16, 12, generator=g)
    weights = torch.stack([common + torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g) * 0.5
                           for _ in range(4)])
    grams = torch.eye(12).expand(4, 12, 12).contiguous()
    settings = FitSettings(steps=200, lr=3e-2)
    factors, start, end = fit_projection(weights, grams, 2, settings, "test")
    again, _, end_again = fit_projection(weights, grams, 2, settings, "test")
    assert end < 0.25 * start
    assert end == end_again and torch.equal(factors.core, again.core)


@pytest.fixture(scope="module")
def tiny_shared_core(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(dense tiny qwen3_moe, its shared-core compression at ~60 %)."""
    from offline.compress import CompressionOptions, compress

    dense = tiny_model_dir("qwen3_moe")
    options = CompressionOptions(calib=str(KJV / "validation.txt"), num_samples=8, seq_len=32, batch_size=4,
                                 method="shared-core", ratio=0.6, ratio_tolerance=0.05)
    return dense, compress(dense, tmp_path_factory.mktemp("shared_core") / "compressed", options)


def test_shared_core_checkpoint_is_what_the_reference_computes(tiny_shared_core, tmp_path):
    """The reference's SharedCoreExperts equal the dense experts they expand to, loaded by plain
    transformers from the dense-equivalent checkpoint."""
    from offline.reference import load_reference_model
    from offline.dense_expansion import write_dense_equivalent_checkpoint
    from offline.shared_core import SharedCoreExperts

    _, compressed = tiny_shared_core
    block = read_moe_svd_config(compressed)
    assert {spec.form for spec in block.layers.values()} == {"shared_core"}
    assert 0.55 <= block.params.ratio <= 0.65
    model = load_reference_model(compressed)
    assert all(isinstance(layer.mlp.experts, SharedCoreExperts) for layer in model.model.layers)
    dense = load_reference_model(write_dense_equivalent_checkpoint(compressed, tmp_path / "dense"))
    ids = torch.tensor([list(range(1, 40))])
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    # float32, two association orders of the same products through 4 layers: ~1e-5 of the logit scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_shared_core_is_recoverable(tiny_shared_core, tmp_path):
    dense, compressed = tiny_shared_core
    out = recover(compressed, tmp_path / "out", _options(dense, stage2=False))
    for r in json.loads((out / REPORT_FILE).read_text())["stage1"]["layers"]:
        assert r["error_after"] < MEASURABLE * r["error_before"]
    validate_checkpoint_files(out, json.loads((out / "config.json").read_text()), read_moe_svd_config(out))


def test_the_plugin_refuses_shared_core(tiny_shared_core):
    from serve.launch import ServerOptions, ServerStartError, VLLMServer

    _, compressed = tiny_shared_core
    server = VLLMServer(ServerOptions(model=str(compressed), dtype="float32", enforce_eager=True))
    with pytest.raises(ServerStartError) as failure:
        server.start()
    assert server.process is None
    assert "shared_core" in str(failure.value) and "cannot be served" in str(failure.value)
