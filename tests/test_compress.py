"""End to end: `moesvd compress` on the tiny qwen3_moe and mixtral fixtures, and every error case."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from moesvd_vllm.errors import CheckpointError
from moesvd_vllm.format.directories import OutputExistsError, read_config
from moesvd_vllm.format.schema import SchemaError, read_moe_svd_config
from offline.calibration_data import CalibrationError
from offline.compress import CompressionOptions, OptionsError, compress
from offline.decompose import WhiteningError
from offline.expert_tensors import CheckpointTensors
from offline.sensitivity import RatioError
from tests.support.signals import default_sigint

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


# Parameter counts by hand. Tiny fixtures: H = 128, I = 128, E = 8 experts, 4 MoE layers.
#   dense MoE layer: E * 3 * I * H = 8 * 3 * 128 * 128 = 393,216; the model: 4 * 393,216 = 1,572,864
#   shared_basis layer of rank r, I' kept neurons, K banks: 2 * r * H (the bases, when stored) + K * 3 * I' * r
#     no bases (r = H = 128, K = 8):       8 * 3 * I' * 128          = 3,072 I'
#     bases, K = 8, I' = 64:               2 * r * 128 + 8 * 3 * 64 * r = 1,792 r
#     bases, K = 2 (U-trimming), I' = 128: 2 * r * 128 + 2 * 3 * 128 * r = 1,024 r
#   per_expert layer of rank r: E * r * 3 * (H + I) = 8 * r * 3 * 256 = 6,144 r
# Layer shapes: {layer: (rank, kept neurons or None for all I, banks, bases)}; what the plan chose.
EXPECTED = {
    # 3,072 * (88 + 88 + 96 + 88) = 3,072 * 360
    ("qwen3_moe", "moe-svd-stacked", 0.3): (
        {0: (128, 88, 8, False), 1: (128, 88, 8, False), 2: (128, 96, 8, False), 3: (128, 88, 8, False)},
        1_105_920),
    # 1,792 * (96 + 96 + 96 + 64) = 1,792 * 352
    ("qwen3_moe", "moe-svd-stacked", 0.6): (
        {0: (96, 64, 8, True), 1: (96, 64, 8, True), 2: (96, 64, 8, True), 3: (64, 64, 8, True)}, 630_784),
    # 3,072 * (72 + 80 + 72 + 80) = 3,072 * 304
    ("mixtral", "moe-svd-stacked", 0.4): (
        {0: (128, 72, 8, False), 1: (128, 80, 8, False), 2: (128, 72, 8, False), 3: (128, 80, 8, False)},
        933_888),
    # layers 1 and 3 dense: 2 * 393,216 = 786,432; + 1,024 * 96 = 98,304; + 1,024 * 64 = 65,536
    ("mixtral", "moe-svd", 0.4): ({0: (96, None, 2, True), 2: (64, None, 2, True)}, 950_272),
    # 6,144 * (38 + 38 + 39 + 39) = 6,144 * 154
    ("qwen3_moe", "whitened-svd", 0.4): (
        {0: (38, None, 8, True), 1: (38, None, 8, True), 2: (39, None, 8, True), 3: (39, None, 8, True)},
        946_176),
    # 6,144 * (51 + 51 + 51 + 52) = 6,144 * 205
    ("mixtral", "svd", 0.2): (
        {0: (51, None, 8, True), 1: (51, None, 8, True), 2: (51, None, 8, True), 3: (52, None, 8, True)},
        1_259_520),
}
TINY_DENSE_EXPERT_PARAMS = 1_572_864  # 4 * 8 * 3 * 128 * 128


def _expected_factor_tensors(model_type: str, index: int, spec, hidden: int, intermediate: int
                             ) -> dict[str, tuple[tuple[int, ...], str]]:
    """The names and shapes docs/format.md gives for one compressed layer of a float32 model, spelled out
    here independently of the writer (float32 factors; bases in the model's dtype with basis_dtype auto)."""
    layout = moe_layout(model_type)
    prefix = f"model.layers.{index}.{layout.moe_module}"
    r, kept = spec.rank, spec.intermediate or intermediate
    out = {}
    if spec.form == "shared_basis":
        if spec.bases:
            out[f"{prefix}.moe_svd_in.weight"] = ((r, hidden), "float32")
            out[f"{prefix}.moe_svd_out.weight"] = ((hidden, r), "float32")
        for bank in range(spec.num_banks):
            name = f"{prefix}.experts.{bank}"
            out[f"{name}.{layout.gate_proj}.weight"] = ((kept, r), "float32")
            out[f"{name}.{layout.up_proj}.weight"] = ((kept, r), "float32")
            out[f"{name}.{layout.down_proj}.weight"] = ((r, kept), "float32")
        return out
    for e in range(spec.num_experts):  # per_expert: W ~= lora_b [out, r] @ lora_a [r, in]
        name = f"{prefix}.experts.{e}"
        for proj, (rows, cols) in ((layout.gate_proj, (intermediate, hidden)), (layout.up_proj, (intermediate, hidden)),
                                   (layout.down_proj, (hidden, intermediate))):
            out[f"{name}.{proj}.lora_a"] = ((r, cols), "float32")
            out[f"{name}.{proj}.lora_b"] = ((rows, r), "float32")
    return out


def _check_checkpoint(dense_dir: Path, out: Path, options: CompressionOptions, expected_params: int) -> None:
    config, dense_config = read_config(out), read_config(dense_dir)
    assert config["model_type"] == dense_config["model_type"]
    assert config["architectures"] == [PLUGIN_ARCHITECTURES[a] for a in dense_config["architectures"]]
    block = read_moe_svd_config(out)  # strict validation
    assert block.method == options.method
    assert block.original_architectures == dense_config["architectures"]
    assert len(block.calibration.sha256) == 64 and block.calibration.num_samples == options.num_samples
    assert block.options["method"] == options.method
    assert abs(block.params.ratio - options.ratio) <= options.ratio_tolerance
    assert block.params.expert_dense == TINY_DENSE_EXPERT_PARAMS
    assert block.params.expert_compressed == expected_params
    assert block.decomposed_layers, "nothing was decomposed"

    dense, compressed = CheckpointTensors(dense_dir), CheckpointTensors(out)
    # the routed-expert parameters actually written (dense layers' experts included) match the hand count
    written = sum(math.prod(compressed.shape(n)) for n in compressed.names() if _expert_like(n))
    assert written == expected_params
    layout = moe_layout(config["model_type"])
    dims = moe_dims(dense_config)
    written_experts = set()
    for index in block.decomposed_layers:
        prefix = f"model.layers.{index}.{layout.moe_module}."
        got = {n: (compressed.shape(n), compressed.dtype(n)) for n in compressed.names()
               if n.startswith(prefix) and _expert_like(n)}
        assert got == _expected_factor_tensors(config["model_type"], index, block.layer(index), dims.hidden,
                                               dims.intermediate)
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


def _layer_shapes(block) -> dict[int, tuple]:
    return {int(k): (s.rank, s.intermediate, s.num_banks, s.bases) for k, s in block.layers.items()}


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
    shapes, params = EXPECTED[(arch, method, ratio)]
    block = read_moe_svd_config(out)
    assert _layer_shapes(block) == shapes
    _check_checkpoint(dense_dir, out, options, params)
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
    # all four layers at I' = 64, no bases: 4 * 8 * 3 * 64 * 128 = 786,432 (half the dense 1,572,864)
    assert _layer_shapes(block) == {i: (128, 64, 8, False) for i in range(4)}
    assert block.params.expert_compressed == 786_432


@pytest.mark.parametrize("step", [0, 12])
def test_intermediate_step_must_be_a_multiple_of_the_format_granularity(step):
    with pytest.raises(OptionsError, match="intermediate_step must be a positive multiple of 8"):
        CompressionOptions(ratio=0.4, calib="x", intermediate_step=step)


def test_compressed_checkpoint_runs_in_the_reference_model(tiny_model_dir, tmp_path):
    """offline.reference reads what we wrote; its experts approximate the dense ones.
    (Logits of a random tiny model are too chaotic to bound: 7 % weight error moves them ~90 %.)"""
    from offline.expert_tensors import read_layer_experts
    from offline.reference import load_reference_model
    from offline.dense_expansion import expand_to_dense_state_dict

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


# ------------------------------------------------------------------------------------------ options, methods
def test_unknown_option_is_refused_with_the_known_ones():
    with pytest.raises(OptionsError, match=r"unknown compression option\(s\) \['rnak_threshold'\]; known: "
                                           r".*'rank_threshold'"):
        CompressionOptions.from_dict({"ratio": 0.4, "calib": "x", "rnak_threshold": 0.1})


@pytest.mark.parametrize("method,selection,fraction,trim_keep", [
    ("moe-svd-stacked", "sensitivity", 0.5, None), ("moe-svd", "sensitivity", 1.0, 2),
    ("svd", "all", 1.0, None), ("whitened-svd", "all", 1.0, None)])
def test_options_left_unset_take_the_method_classes_defaults(method, selection, fraction, trim_keep):
    recorded = CompressionOptions(ratio=0.4, calib="x", method=method).recorded()
    assert (recorded["selection"], recorded["min_intermediate_fraction"], recorded["trim_keep"]) == (
        selection, fraction, trim_keep)
    explicit = CompressionOptions(ratio=0.4, calib="x", method=method, selection="all", trim_keep=3).recorded()
    assert (explicit["selection"], explicit["trim_keep"]) == ("all", 3)


def test_neuron_selection_is_refused_for_a_per_expert_method():
    with pytest.raises(OptionsError, match="needs a shared-basis method, not 'svd'"):
        CompressionOptions(ratio=0.4, calib="x", method="svd", min_intermediate_fraction=0.5)


def test_cli_flags_are_generated_from_the_options_and_the_method_registry(tmp_path):
    from moesvd_vllm.options import from_arguments
    from offline.cli_compress import add_arguments
    from offline.methods import method_names

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    assert set(flags) >= {f.name for f in dataclasses.fields(CompressionOptions)}
    assert all(flags[f.name].help for f in dataclasses.fields(CompressionOptions))
    assert tuple(flags["method"].choices) == method_names() == (
        "moe-svd-stacked", "magnitude-neurons", "moe-svd", "svd", "whitened-svd", "shared-core")
    args = parser.parse_args(["model", "--out", str(tmp_path / "o"), "--ratio", "0.4", "--calib", "c.txt",
                              "--method", "moe-svd", "--no-routing-weighted", "--trim-keep", "3"])
    assert from_arguments(CompressionOptions, args) == CompressionOptions(
        ratio=0.4, calib="c.txt", method="moe-svd", routing_weighted=False, trim_keep=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "--out", "o", "--ratio", "0.4", "--calib", "c", "--method", "nope"])


@pytest.fixture
def coordinate_bases_method():
    """A method defined the way a new file in offline/methods/ would define it: subclassing registers it."""
    from offline.methods import base
    from offline.methods.shared_basis import SharedBasisMethod

    class FirstCoordinateBases(SharedBasisMethod):
        name = "test-first-coordinates"
        summary = "A = the first r coordinates, B = A^T (a test method)"

        def shared_bases(self, work, experts, grams, rank, members):
            basis_in = torch.eye(work.dims.hidden, dtype=torch.float64)[:rank]
            return basis_in, basis_in.T.clone()

    yield FirstCoordinateBases.name
    base._REGISTRY.pop(FirstCoordinateBases.name)


def test_a_registered_method_runs_through_the_pipeline(tiny_model_dir, tmp_path, coordinate_bases_method):
    from offline.methods import method_names

    assert coordinate_bases_method in method_names()
    out = compress(tiny_model_dir("qwen3_moe"), tmp_path / "out",
                   _options(method=coordinate_bases_method, ratio=0.6, ratio_tolerance=0.05))
    block = read_moe_svd_config(out)
    assert block.method == coordinate_bases_method and block.options["selection"] == "sensitivity"
    tensors = CheckpointTensors(out)
    for index in block.decomposed_layers:
        spec = block.layer(index)
        assert spec.bases and spec.intermediate is None  # the base class's defaults: ranks only
        basis_in = tensors.get(f"model.layers.{index}.mlp.moe_svd_in.weight")
        assert torch.equal(basis_in, torch.eye(128)[:spec.rank])


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
    _check_checkpoint(model, compress(model, tmp_path / "out", options), options,
                      EXPECTED[("mixtral", "svd", 0.2)][1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing_that_looks_finished_and_resumes(tiny_model_dir, tmp_path, sig):
    """Ctrl-C / SIGTERM (preemption) once a layer is journaled: nothing at the output path, the hidden
    partial output and its journal kept, the log says `--resume`; `--resume` then finishes the checkpoint.
    (An error instead removes both: tests/test_scale.py.)"""
    model = tiny_model_dir("qwen3_moe")
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "moesvd_vllm.cli", "compress", str(model), "--out", str(work / "out"),
           "--ratio", "0.4", "--calib", str(CALIB), "--method", "whitened-svd", "--num-samples", "64",
           "--seq-len", "64"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=default_sigint)
    journal = work / ".out.journal" / "journal.jsonl"
    deadline = time.monotonic() + 300
    while not (journal.exists() and '"kind":"decomposition"' in journal.read_text()):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no layer was journaled"
        time.sleep(0.02)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, output[-2000:]
    assert _entries(work) == {".out.partial", ".out.journal"}, output[-2000:]
    assert not (work / ".out.partial" / "config.json").exists()
    assert "`--resume` continues" in output, output[-2000:]
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert _entries(work) == {"out"} and (work / "out" / "config.json").is_file()


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
    assert read_moe_svd_config(fused_out).layers == read_moe_svd_config(plain_out).layers
    assert set(fused.names()) == set(plain.names())
    for name in plain.names():
        assert torch.equal(fused.get(name), plain.get(name)), name
