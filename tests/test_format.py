"""The compressed-checkpoint format, pinned: golden tensor lists and parameter counts written by hand.

Each golden checkpoint is written by `offline.compress.compress` on a 2-layer tiny fixture (H = I = 128,
8 experts, top-2) with `selection="all"`, so both MoE layers are decomposed at one shape; the names, shapes
and dtypes below are spelled out from docs/format.md, not computed by the code under test, and the
parameter counts are worked out by hand in the comments. Also here: the writer never writes NaN/Inf and
leaves nothing behind, safetensors' refusal of a truncated shard is reported naming the file, and the
validator's messages name the layer, the tensor and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesvd_vllm.errors import CheckpointError, NonFiniteTensorError
from moesvd_vllm.format.safetensors_io import INDEX_FILE, checkpoint_tensor_infos, tensor_infos, verify_weight_files
from moesvd_vllm.format.directories import atomic_directory, read_config
from moesvd_vllm.format.schema import LayerSpec, MoESVDConfig, ParamCounts, read_moe_svd_config
from moesvd_vllm.format.validator import CheckpointMismatchError, CheckpointValidator, validate_checkpoint_files
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline.compress import CompressionOptions, compress

REPO = Path(__file__).resolve().parent.parent
CALIB = REPO / "offline" / "bundled" / "kjv_text" / "validation.txt"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4, selection="all")
LAYERS = (0, 1)


def _dense_part(arch: str, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every non-expert tensor of the 2-layer tiny fixture, copied unchanged (Hub names)."""
    out = {"model.embed_tokens.weight": ((512, 128), dtype), "model.norm.weight": ((128,), dtype),
           "lm_head.weight": ((512, 128), dtype)}
    for layer in LAYERS:
        p = f"model.layers.{layer}."
        out.update({p + "input_layernorm.weight": ((128,), dtype),
                    p + "post_attention_layernorm.weight": ((128,), dtype),
                    p + "self_attn.q_proj.weight": ((128, 128), dtype),
                    p + "self_attn.k_proj.weight": ((64, 128), dtype),
                    p + "self_attn.v_proj.weight": ((64, 128), dtype),
                    p + "self_attn.o_proj.weight": ((128, 128), dtype)})
        if arch == "qwen3_moe":
            out.update({p + "self_attn.q_norm.weight": ((32,), dtype), p + "self_attn.k_norm.weight": ((32,), dtype),
                        p + "mlp.gate.weight": ((8, 128), dtype)})
        else:
            out[p + "block_sparse_moe.gate.weight"] = ((8, 128), dtype)
    return out


def _per_layer(moe: str, layer_tensors: dict, banks: int, bank_tensors: dict) -> dict:
    """The golden expert tensors of both layers: `layer_tensors` once per layer, `bank_tensors` per bank."""
    out = {}
    for layer in LAYERS:
        p = f"model.layers.{layer}.{moe}."
        out.update({p + name: value for name, value in layer_tensors.items()})
        for k in range(banks):
            out.update({f"{p}experts.{k}.{name}": value for name, value in bank_tensors.items()})
    return out


GOLDEN = {
    # moe-svd-stacked on bf16 Qwen3-MoE: bases A [96, 128], B [128, 96] (basis dtype "auto" = bf16),
    # 8 banks of factors with I' = 64 kept neurons: gate/up [64, 96], down [96, 64].
    # per layer 2*96*128 + 8*3*64*96 = 24576 + 147456 = 172032; dense 8*3*128*128 = 393216
    "shared_basis with bases": dict(
        arch="qwen3_moe", dtype="bfloat16", options=dict(method="moe-svd-stacked", ratio=0.5625),
        spec=dict(form="shared_basis", rank=96, intermediate=64, bases=True, banks=8, basis_dtype="bfloat16"),
        experts=_per_layer("mlp", {"moe_svd_in.weight": ((96, 128), "bfloat16"),
                                   "moe_svd_out.weight": ((128, 96), "bfloat16")},
                           8, {"gate_proj.weight": ((64, 96), "bfloat16"), "up_proj.weight": ((64, 96), "bfloat16"),
                               "down_proj.weight": ((96, 64), "bfloat16")}),
        params=(786432, 344064)),
    # the paper's moe-svd on bf16 Mixtral: U-trimming keeps 2 of 8 experts -> 2 banks; float32 bases
    # A [96, 128], B [128, 96]; factors w1/w3 [128, 96], w2 [96, 128] in bf16 (all I = 128 neurons).
    # per layer 2*96*128 + 2*3*128*96 = 24576 + 73728 = 98304
    "shared_basis with banks (U-trimming)": dict(
        arch="mixtral", dtype="bfloat16", options=dict(method="moe-svd", ratio=0.75, basis_dtype="float32"),
        spec=dict(form="shared_basis", rank=96, intermediate=None, bases=True, banks=2, basis_dtype="float32"),
        experts=_per_layer("block_sparse_moe", {"moe_svd_in.weight": ((96, 128), "float32"),
                                                "moe_svd_out.weight": ((128, 96), "float32")},
                           2, {"w1.weight": ((128, 96), "bfloat16"), "w3.weight": ((128, 96), "bfloat16"),
                               "w2.weight": ((96, 128), "bfloat16")}),
        params=(786432, 196608)),
    # neuron selection only (bases: false, rank = H = 128): no bases, gate/up [64, 128], down [128, 64].
    # per layer 8*3*64*128 = 196608
    "bases false with kept neurons": dict(
        arch="qwen3_moe", dtype="float32",
        options=dict(method="moe-svd-stacked", ratio=0.5, min_intermediate_fraction=0.25, intermediate_step=8),
        spec=dict(form="shared_basis", rank=128, intermediate=64, bases=False, banks=8, basis_dtype="float32"),
        experts=_per_layer("mlp", {}, 8, {"gate_proj.weight": ((64, 128), "float32"),
                                          "up_proj.weight": ((64, 128), "float32"),
                                          "down_proj.weight": ((128, 64), "float32")}),
        params=(786432, 393216)),
    # plain per-expert SVD at rank 32: lora_a [32, in], lora_b [out, 32] for every expert and projection.
    # per layer 8*32*3*(128 + 128) = 196608
    "per_expert": dict(
        arch="qwen3_moe", dtype="float32", options=dict(method="svd", ratio=0.5),
        spec=dict(form="per_expert", rank=32, intermediate=None, bases=True, banks=8, basis_dtype="float32"),
        experts=_per_layer("mlp", {}, 8, {f"{proj}.{part}": (shape, "float32")
                                          for proj in ("gate_proj", "up_proj", "down_proj")
                                          for part, shape in (("lora_a", (32, 128)), ("lora_b", (128, 32)))}),
        params=(786432, 393216)),
}
PLUGIN_NAMES = {"qwen3_moe": ["MoESVDQwen3MoeForCausalLM"], "mixtral": ["MoESVDMixtralForCausalLM"]}


@pytest.fixture(scope="module")
def golden_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from offline.fixtures.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("golden")
    dense: dict[tuple[str, str], Path] = {}
    out = {}
    for form, golden in GOLDEN.items():
        key = (golden["arch"], golden["dtype"])
        if key not in dense:
            dense[key] = build_tiny_checkpoint(key[0], root / "-".join(key), num_layers=2, dtype=key[1])
        options = CompressionOptions(calib=str(CALIB), **SMALL, **golden["options"])
        out[form] = compress(dense[key], root / form.replace(" ", "_"), options)
    return out


@pytest.mark.parametrize("form", list(GOLDEN))
def test_golden_tensor_list(golden_checkpoints, form):
    golden = GOLDEN[form]
    written = {name: tuple(info) for name, info in checkpoint_tensor_infos(golden_checkpoints[form])}
    expected = {**_dense_part(golden["arch"], golden["dtype"]), **golden["experts"]}
    assert sorted(set(written) - set(expected)) == [] and sorted(set(expected) - set(written)) == []
    assert written == expected


@pytest.mark.parametrize("form", list(GOLDEN))
def test_golden_block_and_parameter_counts(golden_checkpoints, form):
    golden, out = GOLDEN[form], golden_checkpoints[form]
    config = read_config(out)
    assert config["architectures"] == PLUGIN_NAMES[golden["arch"]]
    block = read_moe_svd_config(out)
    assert block.format_version == 2 and block.method == golden["options"]["method"]
    assert (block.params.expert_dense, block.params.expert_compressed) == golden["params"]
    spec = golden["spec"]
    for key in ("0", "1"):
        layer = block.layers[key]
        assert (layer.form, layer.rank, layer.intermediate, layer.bases, layer.num_banks, layer.basis_dtype) == (
            spec["form"], spec["rank"], spec["intermediate"], spec["bases"], spec["banks"], spec["basis_dtype"])
        assert layer.num_experts == 8 and sorted(set(layer.bank_map)) == list(range(spec["banks"]))
    assert json.loads((out / INDEX_FILE).read_text())["weight_map"].keys() == dict(checkpoint_tensor_infos(out)).keys()
    validate_checkpoint_files(out, config, block)  # what the plugin's pre-flight runs


# ------------------------------------------------------------------------------------------ the writer
def _tiny_config() -> dict:
    from offline.fixtures.tiny import tiny_config

    return tiny_config("qwen3_moe", num_layers=2)


def test_a_non_finite_tensor_is_refused_naming_it_and_nothing_is_left(tmp_path):
    out = tmp_path / "out"
    bad = torch.ones(4, 3)
    bad[1, 2], bad[3, 0] = float("nan"), float("-inf")
    with pytest.raises(NonFiniteTensorError) as error:
        with CompressedCheckpointWriter(_tiny_config(), out) as writer:
            writer.add("model.layers.0.mlp.gate.weight", torch.zeros(8, 128), stage=COPIED)
            with writer.stage("the moe-svd decomposition"):
                writer.add("model.layers.1.mlp.experts.3.up_proj.weight", bad)
    message = str(error.value)
    for fragment in ("model.layers.1.mlp.experts.3.up_proj.weight", "decoder layer 1", "1 NaN and 1 Inf",
                     "the moe-svd decomposition", "Nothing was written"):
        assert fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype, bad", [
    (dtype, bad) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for bad in (float("nan"), float("inf"), float("-inf"))] + [(torch.float8_e4m3fn, float("nan"))])  # no inf
def test_every_non_finite_value_of_every_float_dtype_is_found(dtype, bad):
    from moesvd_vllm.format.writer import check_finite

    values = torch.randn(3, 5).to(dtype)
    check_finite("model.layers.0.mlp.experts.0.w1.weight", values, "test")
    values[2, 4] = bad
    with pytest.raises(NonFiniteTensorError, match=r"model\.layers\.0\.mlp\.experts\.0\.w1\.weight \(decoder "
                                                   r"layer 0\): [01] NaN and [01] Inf of 15 values"):
        check_finite("model.layers.0.mlp.experts.0.w1.weight", values, "test")
    check_finite("model.layers.0.mlp.gate.bias", torch.tensor([1, 2, 3]), "test")  # integers: nothing to check


def test_compress_refuses_a_non_finite_input_tensor_and_leaves_nothing(tiny_model_dir, tmp_path):
    """lm_head is never run by the layer-wise pipeline, only copied: the writer is what stops it."""
    model = tmp_path / "model"
    model.mkdir()
    source = tiny_model_dir("qwen3_moe", num_layers=2)
    for path in source.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    with safe_open(model / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["lm_head.weight"][5, 7] = float("inf")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(NonFiniteTensorError, match=r"lm_head\.weight \(outside the decoder layers\): 0 NaN and 1 "
                                                   r"Inf .*copying from the input checkpoint.*repair"):
        compress(model, tmp_path / "out", CompressionOptions(calib=str(CALIB), method="svd", ratio=0.5, **SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_writer_closed_without_finish_or_failing_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(CheckpointError, match="closed before finish"):
        with CompressedCheckpointWriter(_tiny_config(), out, replace=True) as writer:
            writer.add("model.norm.weight", torch.ones(128))
    with pytest.raises(RuntimeError, match="boom"):
        with CompressedCheckpointWriter(_tiny_config(), out, replace=True):
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "previous run"


def test_writer_refuses_tensors_that_disagree_with_the_block(tmp_path):
    spec = LayerSpec("shared_basis", 32, 8, list(range(8)), intermediate=64)
    with pytest.raises(CheckpointMismatchError, match=r"decoder layer 1, tensor model\.layers\.1\.mlp\.experts\.0\."
                                                      r"gate_proj\.weight: shape \[64, 64\].*expected \[64, 32\]"
                                                      r".*bug in moesvd-vllm"):
        with CompressedCheckpointWriter(_tiny_config(), tmp_path / "out") as writer:
            writer.add("model.layers.1.mlp.gate.weight", torch.zeros(8, 128))
            writer.add("model.layers.1.mlp.experts.0.gate_proj.weight", torch.zeros(64, 64))
            writer.finish(method="test", layers={"1": spec}, options={})
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_an_architecture_without_a_plugin_class(tmp_path):
    config = dict(_tiny_config(), architectures=["Qwen3MoeModel"])
    with pytest.raises(ValueError, match=r"\['Qwen3MoeModel'\] of config.json have no MoE-SVD plugin class"):
        CompressedCheckpointWriter(config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_publishes_only_on_success(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "x") as partial:
            assert partial.name.startswith(".x.") and partial.name.endswith(".partial")
            (partial / "a").write_text("1")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "x") as partial:
        (partial / "a").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and (tmp_path / "x" / "a").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
    with pytest.raises(FileExistsError, match="already exists.*--force"):
        with atomic_directory(tmp_path / "x"):
            pass


@pytest.mark.parametrize("sig,expected", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_that_surfaces_as_another_error_is_still_an_interruption(tmp_path, sig, expected):
    """A signal landing inside a C extension (measured: safetensors' get_tensor under Ctrl-C raised
    "ValueError: could not determine the shape ...") must keep a resumable partial directory like a plain
    Ctrl-C / SIGTERM, and be raised as the interruption it was; a real error still removes it."""
    before = {s: signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.getsignal(s))
              for s in (signal.SIGINT, signal.SIGTERM)}
    partial = tmp_path / ".x.partial"
    with pytest.raises(expected) as raised:
        with atomic_directory(tmp_path / "x", partial=partial, keep_on_interrupt=lambda: True):
            (partial / "a").write_text("1")
            try:
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs here
            except (KeyboardInterrupt, SystemExit) as error:
                raise ValueError("could not determine the shape of object type") from error
    assert isinstance(raised.value.__cause__, ValueError)
    assert [p.name for p in tmp_path.iterdir()] == [".x.partial"] and (partial / "a").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "y", partial=tmp_path / ".y.partial", keep_on_interrupt=lambda: True):
            raise ValueError("a real error")
    assert not (tmp_path / ".y.partial").exists()
    assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]  # the writer's handlers are gone again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, before[signal.SIGINT])


# ------------------------------------------------------------------------------------------ reading
def test_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(3)}, str(path))
    assert tensor_infos(path) == {"a": ((64, 64), "float32"), "b": ((3,), "float32")}
    data = path.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 5):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"{path}: safetensors cannot read this file .*truncated"):
            tensor_infos(path)
        with pytest.raises(CheckpointError, match=str(path)):
            verify_weight_files(tmp_path)


def test_header_listing_needs_no_torch(tmp_path):
    code = ("import sys; import moesvd_vllm.format.validator, moesvd_vllm.format.writer, moesvd_vllm.preflight; "
            "from moesvd_vllm.format.safetensors_io import tensor_infos; "
            f"print(tensor_infos({str(tmp_path / 'm.safetensors')!r})); assert 'torch' not in sys.modules")
    save_file({"w": torch.zeros(2, 3, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "'w': TensorInfo(shape=(2, 3), dtype='bfloat16')" in result.stdout


# ------------------------------------------------------------------------------------------ the validator
def _block(**spec) -> MoESVDConfig:
    layer = LayerSpec(**{"form": "shared_basis", "rank": 32, "num_experts": 8, "bank_map": [0, 0, 1, 1, 2, 2, 3, 3],
                         "intermediate": 64, **spec})
    return MoESVDConfig(format_version=2, method="test", original_architectures=["Qwen3MoeForCausalLM"],
                        layers={"1": layer}, params=ParamCounts(1, 1))


def _good_layer_1() -> dict[str, tuple[tuple[int, ...], str]]:
    p = "model.layers.1.mlp."
    out = {p + "gate.weight": ((8, 128), "bfloat16"), p + "moe_svd_in.weight": ((32, 128), "float32"),
           p + "moe_svd_out.weight": ((128, 32), "float32")}
    for k in range(4):
        out.update({f"{p}experts.{k}.gate_proj.weight": ((64, 32), "bfloat16"),
                    f"{p}experts.{k}.up_proj.weight": ((64, 32), "bfloat16"),
                    f"{p}experts.{k}.down_proj.weight": ((32, 64), "bfloat16")})
    return out


def _validate(tensors: dict, block: MoESVDConfig | None = None) -> None:
    validator = CheckpointValidator.for_config(_tiny_config(), block or _block())
    for name, (shape, dtype) in tensors.items():
        validator.check(name, shape, dtype)
    validator.finish()


def test_validator_accepts_the_expected_tensors():
    _validate(_good_layer_1())
    _validate({**_good_layer_1(), "model.layers.0.mlp.experts.5.up_proj.weight": ((128, 128), "bfloat16")})


def _edited(edit) -> dict:
    tensors = _good_layer_1()
    edit(tensors)
    return tensors


FIX = "re-create it with `moesvd compress`"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.weight"),
     r"decoder layer 1: tensor\(s\) model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight missing from the checkpoint "
     r"\(shared_basis rank 32, 4 bank\(s\), hidden 128, intermediate 64, bases yes\)"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.4.up_proj.weight", ((64, 32), "bfloat16")),
     r"decoder layer 1, tensor model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight: unexpected.*4 bank\(s\)"),
    (lambda t: t.__setitem__("model.layers.1.mlp.moe_svd_in.weight", ((128, 32), "float32")),
     r"decoder layer 1, tensor model\.layers\.1\.mlp\.moe_svd_in\.weight: shape \[128, 32\] in the checkpoint, "
     r"expected \[32, 128\] for shared_basis rank 32"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.2.gate_proj.weight", ((64, 32), "float32")),
     r"decoder layer 1, tensor model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight: dtype float32 in the "
     r"checkpoint, expected bfloat16 \(the model dtype \(that of the router\)\)"),
    (lambda t: t.__setitem__("model.layers.1.mlp.moe_svd_out.weight", ((128, 32), "bfloat16")),
     r"moe_svd_out\.weight: dtype bfloat16 in the checkpoint, expected float32 \(moe_svd\.layers\.1\.basis_dtype\)"),
    (lambda t: t.pop("model.layers.1.mlp.gate.weight"),
     r"decoder layer 1: router model\.layers\.1\.mlp\.gate\.weight missing"),
    (lambda t: t.__setitem__("model.layers.1.mlp.gate.weight", ((4, 128), "bfloat16")),
     r"decoder layer 1, router model\.layers\.1\.mlp\.gate\.weight: shape \[4, 128\], expected \[8, 128\]"),
])
def test_validator_names_layer_tensor_and_fix(edit, message):
    with pytest.raises(CheckpointMismatchError, match=message) as error:
        _validate(_edited(edit))
    assert FIX in str(error.value)


def test_validator_refuses_a_block_that_disagrees_with_config_json():
    with pytest.raises(CheckpointMismatchError, match=r"moe_svd\.layers\.1\.num_experts=4 but config\.json has 8"):
        _validate(_good_layer_1(), _block(num_experts=4, bank_map=[0, 1, 2, 3]))
    layer = _block().layers["1"]
    beyond = MoESVDConfig(format_version=2, method="test", original_architectures=["Qwen3MoeForCausalLM"],
                          layers={"2": layer}, params=ParamCounts(1, 1))
    with pytest.raises(CheckpointMismatchError, match=r"decoder layer 2 is not a MoE layer .*\[0, 1\]"):
        _validate(_good_layer_1(), beyond)
