"""End to end: `moesvd compress` on the tiny qwen3_moe and mixtral fixtures, and every error case."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES, moe_dims, moe_layer_indices, moe_layout

from moesvd_vllm.format.schema import (

    SchemaError,

    decomposed_layer_params,

    dense_layer_params,

    expected_layer_tensors,

    read_moe_svd_config,

)
from offline.calibration import CalibrationError
from moesvd_vllm.errors import CheckpointError
from moesvd_vllm.format.safetensors_io import OutputExistsError, read_config
from offline.compress import CompressionOptions, OptionsError, compress
from offline.decompose import WhiteningError
from offline.expert_tensors import CheckpointTensors
from offline.sensitivity import RatioError

REPO = Path(__file__).resolve().parent.parent
CALIB = REPO / "offline" / "bundled" / "kjv_text" / "validation.txt"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4)


def _options(**kwargs) -> CompressionOptions:
    # kept neurons in steps of 8: the tiny fixtures (I = 128) reach ratios like 0.3 within 1 point
    return CompressionOptions(**{"ratio": 0.3, "calib": str(CALIB), "intermediate_step": 8, **SMALL, **kwargs})


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _expert_like(name: str) -> bool:
    return ".experts." in name or ".moe_svd_" in name


def _check_checkpoint(dense_dir: Path, out: Path, options: CompressionOptions) -> None:
    config, dense_config = read_config(out), read_config(dense_dir)
    assert config["model_type"] == dense_config["model_type"]
    assert config["architectures"] == [PLUGIN_ARCHITECTURES[a] for a in dense_config["architectures"]]
    block = read_moe_svd_config(out)  # strict validation
    assert block.method == options.method
    assert block.original_architectures == dense_config["architectures"]
    assert len(block.calibration.sha256) == 64 and block.calibration.num_samples == options.num_samples
    assert block.options["method"] == options.method
    assert abs(block.params.ratio - options.ratio) <= 0.01
    dims = moe_dims(dense_config)
    recount = dense_layer_params(dims) * len(moe_layer_indices(dense_config))
    recount += sum(decomposed_layer_params(s, dims) - dense_layer_params(dims) for s in block.layers.values())
    assert block.params.expert_compressed == recount
    assert block.decomposed_layers, "nothing was decomposed"

    dense, compressed = CheckpointTensors(dense_dir), CheckpointTensors(out)
    layout = moe_layout(config["model_type"])
    expert_dtype = dense.dtype(next(n for n in dense.names() if ".experts." in n))
    written_experts = set()
    for index in block.decomposed_layers:
        spec = block.layer(index)
        expected = expected_layer_tensors(config["model_type"], index, spec, dims, expert_dtype)
        prefix = f"model.layers.{index}.{layout.moe_module}."
        got = {n: (compressed.shape(n), compressed.dtype(n)) for n in compressed.names()
               if n.startswith(prefix) and _expert_like(n)}
        assert got == expected
        written_experts |= set(got)
    # every other tensor is copied unchanged (router, attention, norms, embeddings, dense layers' experts)
    decomposed_prefixes = tuple(f"model.layers.{i}.{layout.moe_module}." for i in block.decomposed_layers)
    kept = [n for n in dense.names() if not (n.startswith(decomposed_prefixes) and _expert_like(n))]
    assert set(compressed.names()) == set(kept) | written_experts
    for name in kept:
        assert torch.equal(compressed.get(name), dense.get(name)), name
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (dense_dir / side).exists():
            assert (out / side).read_bytes() == (dense_dir / side).read_bytes()
    for report in ("report.md", "report.json", "sensitivity.png"):
        assert (out / report).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]][-2:] == ["decomposition pass", "write"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs


@pytest.mark.parametrize("arch,method,ratio", [
    ("qwen3_moe", "moe-svd-stacked", 0.3),
    ("qwen3_moe", "moe-svd-stacked", 0.6),
    ("mixtral", "moe-svd-stacked", 0.4),
    ("mixtral", "moe-svd", 0.4),
    ("qwen3_moe", "whitened-svd", 0.4),
    ("mixtral", "svd", 0.2),
])
def test_compress_writes_a_checkpoint_that_matches_the_schema(tiny_model_dir, tmp_path, arch, method, ratio):
    dense_dir = tiny_model_dir(arch)
    options = _options(method=method, ratio=ratio)
    out = compress(dense_dir, tmp_path / "out", options)
    assert out == tmp_path / "out"
    _check_checkpoint(dense_dir, out, options)
    block = read_moe_svd_config(out)
    if method == "moe-svd":  # U-trimming: 2 kept experts per group of 8
        assert all(spec.num_banks == 2 for spec in block.layers.values())
    if method == "moe-svd-stacked":
        assert all(spec.bank_map == list(range(spec.num_experts)) for spec in block.layers.values())
        assert all(spec.rank % 32 == 0 for spec in block.layers.values())
        errors = json.loads((out / "report.json").read_text())["layers"]
        assert all(max(x["relative_error"].values()) < 1.0 for x in errors if x["decomposed"])
        # the default reduces intermediate neurons first (no bases at full rank), then the rank (with bases)
        dims = moe_dims(read_config(dense_dir))
        for spec in block.layers.values():
            assert spec.intermediate is not None and spec.intermediate < dims.intermediate
            assert spec.bases == (spec.rank < dims.hidden)
            if spec.rank < dims.hidden:
                assert spec.intermediate == dims.intermediate // 2  # min_intermediate_fraction 0.5
        assert all(x["relative_error"]["slimming"] > 0 for x in errors if x["decomposed"])


def test_default_kept_neurons_are_multiples_of_the_x86_kernel_tile(tiny_model_dir, tmp_path):
    """With the default intermediate_step (32) vLLM's x86 kernel holds exactly what the checkpoint counts."""
    options = CompressionOptions(ratio=0.5, calib=str(CALIB), **SMALL)
    out = compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", options)
    block = read_moe_svd_config(out)
    assert abs(block.params.ratio - 0.5) <= 0.01
    assert all(spec.intermediate is not None and spec.intermediate % 32 == 0 for spec in block.layers.values())


@pytest.mark.parametrize("step", [0, 12])
def test_intermediate_step_must_be_a_multiple_of_the_format_granularity(step):
    with pytest.raises(OptionsError, match="intermediate_step must be a positive multiple of 8"):
        CompressionOptions(ratio=0.4, calib="x", intermediate_step=step)


def test_compressed_checkpoint_runs_in_the_reference_model(tiny_model_dir, tmp_path):
    """offline.reference reads what we wrote; its experts approximate the dense ones.
    (Logits of a random tiny model are too chaotic to bound: 7 % weight error moves them ~90 %.)"""
    from offline.expert_tensors import read_layer_experts
    from offline.reference import expand_to_dense_state_dict, load_reference_model

    dense_dir = tiny_model_dir("qwen3_moe")
    out = compress(dense_dir, tmp_path / "out", _options(ratio=0.2))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = load_reference_model(out)(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    expanded = expand_to_dense_state_dict(out)
    config = read_config(dense_dir)
    dims, layout = moe_dims(config), moe_layout(config["model_type"])
    inputs = torch.randn(64, dims.hidden, generator=torch.Generator().manual_seed(1))

    def expert_output(gate, up, down):  # invariant to the order of the intermediate neurons
        return (torch.nn.functional.silu(inputs @ gate.float().T) * (inputs @ up.float().T)) @ down.float().T

    for index in read_moe_svd_config(out).decomposed_layers:
        dense = read_layer_experts(CheckpointTensors(dense_dir), config["model_type"], index, dims)
        prefix = f"model.layers.{index}.{layout.moe_module}.experts"
        for e in range(dims.num_experts):
            approx = [expanded[f"{prefix}.{e}.{name}.weight"]
                      for name in (layout.gate_proj, layout.up_proj, layout.down_proj)]
            reference = expert_output(dense.gate[e], dense.up[e], dense.down[e])
            rel = float((expert_output(*approx) - reference).norm() / reference.norm())
            assert 0 < rel < 1.0, (index, e, rel)  # unweighted inputs; the calibrated error is far lower


# ------------------------------------------------------------------------------------------ errors
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_left(parent: Path, before: set[str]) -> None:
    assert _entries(parent) == before, sorted(_entries(parent) - before)


def test_unknown_architecture_is_rejected(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir("qwen3_moe"), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    before = _entries(tmp_path)
    with pytest.raises(SchemaError, match="not a supported Mixture-of-Experts"):
        compress(model, tmp_path / "out", _options())
    _assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("ratio,message", [(1.2, "strictly between 0 and 1"), (0.0, "strictly between 0 and 1"),
                                           (0.97, "not reachable")])
def test_bad_ratio_is_rejected(tiny_model_dir, tmp_path, ratio, message):
    before = _entries(tmp_path)
    with pytest.raises(RatioError, match=message):
        compress(tiny_model_dir("mixtral"), tmp_path / "out", _options(ratio=ratio))
    _assert_nothing_left(tmp_path, before)


def test_calibration_dataset_name_without_datasets_or_network_is_a_clear_error(tiny_model_dir, tmp_path):
    """Neither a file nor a directory: read as a `datasets` name, which needs the package and network;
    without them the error says so and suggests a local file."""
    before = _entries(tmp_path)
    with pytest.raises(CalibrationError, match=r"(datasets. package is not installed|could not load dataset)"
                                               r".*(local text file|\.txt/\.jsonl file)"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", _options(calib="wikitext:wikitext-2-raw-v1"))
    _assert_nothing_left(tmp_path, before)


def test_calibration_text_shorter_than_one_sample_is_rejected(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning.")
    before = _entries(tmp_path)
    with pytest.raises(CalibrationError, match="shorter than one sample"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", _options(calib=str(short)))
    _assert_nothing_left(tmp_path, before)


def test_gram_beyond_repair_is_rejected(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir("qwen3_moe"), tmp_path / "model")
    path = model / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    # an expert the method replaces (never copied): its intermediate activations, hence its Gram, are NaN
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    before = _entries(tmp_path)
    with pytest.raises(WhiteningError, match="layer 0 .*NaN"):
        compress(model, tmp_path / "out", _options(method="whitened-svd"))
    _assert_nothing_left(tmp_path, before)


def test_existing_output_is_refused_and_replaced_only_with_force(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        compress(tiny_model_dir("qwen3_moe"), out, _options())
    assert (out / "mine.txt").read_text() == "keep me"
    compress(tiny_model_dir("qwen3_moe"), out, _options(force=True))
    assert not (out / "mine.txt").exists()
    read_moe_svd_config(out)
    assert _entries(tmp_path) == {"out"}


def _sharded_copy(src: Path, dst: Path) -> Path:
    """The fixture rewritten as two shards with an index (as large Hub checkpoints are)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy2(p, dst / p.name)
    with safe_open(src / "model.safetensors", framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(dst / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("damage,message", [("missing", "missing"), ("truncated", "truncated")])
def test_missing_or_truncated_shard_is_rejected(tiny_model_dir, tmp_path, damage, message):
    model = _sharded_copy(tiny_model_dir("mixtral"), tmp_path / "model")
    shard = model / "model-00002-of-00002.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
    before = _entries(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        compress(model, tmp_path / "out", _options())
    _assert_nothing_left(tmp_path, before)


def test_sharded_input_compresses(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("mixtral")
    model = _sharded_copy(dense, tmp_path / "model")
    options = _options(method="svd", ratio=0.2)
    _check_checkpoint(model, compress(model, tmp_path / "out", options), options)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing_behind(tiny_model_dir, tmp_path, sig):
    model = tiny_model_dir("qwen3_moe")
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "moesvd_vllm.cli", "compress", str(model), "--out", str(work / "out"),
           "--ratio", "0.4", "--calib", str(CALIB), "--method", "whitened-svd", "--num-samples", "64",
           "--seq-len", "64"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not any(p.name.endswith(".partial") for p in work.iterdir()):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the temporary output directory never appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, output[-2000:]
    assert _entries(work) == set(), output[-2000:]


def test_fused_expert_tensors_are_read(tiny_model_dir, tmp_path):
    """transformers 5 fused experts on disk (gate_up_proj [E, 2I, H], down_proj [E, H, I]) compress the
    same as the Hub's per-expert names."""
    dense = tiny_model_dir("qwen3_moe")
    model = _copy(dense, tmp_path / "model")
    config = read_config(model)
    dims, layout = moe_dims(config), moe_layout(config["model_type"])
    with safe_open(model / "model.safetensors", framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for index in moe_layer_indices(config):
        prefix = f"model.layers.{index}.{layout.moe_module}.experts"
        pop = [lambda e, n=n: tensors.pop(f"{prefix}.{e}.{n}.weight")
               for n in (layout.gate_proj, layout.up_proj, layout.down_proj)]
        gate, up, down = (torch.stack([get(e) for e in range(dims.num_experts)]) for get in pop)
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors[f"{prefix}.down_proj"] = down
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    options = _options(ratio=0.3)
    fused_out = compress(model, tmp_path / "fused", options)
    plain_out = compress(dense, tmp_path / "plain", options)
    fused, plain = CheckpointTensors(fused_out), CheckpointTensors(plain_out)
    block = read_moe_svd_config(fused_out)
    assert block.layers == read_moe_svd_config(plain_out).layers
    for index in block.decomposed_layers:
        for name in expected_layer_tensors(config["model_type"], index, block.layer(index), dims, "float32"):
            assert torch.equal(fused.get(name), plain.get(name)), name
