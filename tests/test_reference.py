"""The PyTorch reference (offline.reference) against exact full-rank conversions (offline.full_rank).

Tiny fixture models use a sharpened init (init_std 0.15): their logits are far from uniform, so a wiring error
(A^T for A, B^T for B, the MoE output lost, the wrong bank) moves the logits by whole units, four orders of
magnitude above the tolerance. `test_wrong_reference_is_detected` checks exactly that.

Models run in float64 (the same on every CPU), so the only differences between a conversion and its dense
original are the float32 roundings of the stored factors and bases (`_tolerance`), and none at all with
identity bases (float64 rounding only).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES, moe_dims

from moesvd_vllm.format.schema import (

    SchemaError,

    decomposed_layer_params,

    dense_layer_params,

    expected_layer_tensors,

    read_moe_svd_config,

)
from moesvd_vllm.format.directories import read_config
from offline.expert_tensors import CheckpointTensors
from offline.fixtures.tiny import TINY_ARCHS, build_tiny_checkpoint, tiny_dims
from offline.full_rank import write_expanded_dense_checkpoint, write_full_rank_checkpoint
from offline.reference import CheckpointError, SharedBasisExperts, load_reference_model
from offline.dense_expansion import expand_to_dense_state_dict, write_dense_equivalent_checkpoint
from tests.support.tolerance import forward_tolerance

ARCHS = ["qwen3_moe", "mixtral"]
INIT_STD = 0.15
BANK_MAP = [0, 1, 0, 2, 1, 3, 3, 0]
WRONG_BY = 1e-2  # a wiring error must move some logit by more than this
# each logit sums, per layer, products over the hidden dimension of (rounded) factors
ROUNDED_TERMS = tiny_dims("qwen3_moe").num_hidden_layers * tiny_dims("qwen3_moe").hidden_size


def _build_dense(arch: str, out_dir: Path) -> Path:
    return build_tiny_checkpoint(arch, out_dir, seed=0, init_std=INIT_STD)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="module")
def dense_dirs(workdir) -> dict[str, Path]:
    return {arch: _build_dense(arch, workdir / f"dense-{arch}") for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_logits(dense_dirs, input_ids):
    """arch -> logits of the dense fixture model (loaded by plain transformers), computed once."""
    cache: dict[str, torch.Tensor] = {}

    def get(arch: str) -> torch.Tensor:
        if arch not in cache:
            cache[arch] = _logits(dense_dirs[arch], input_ids)
        return cache[arch]
    return get


def _logits(model_or_dir, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits in float64 (a loaded model is passed through as it is)."""
    model = (load_reference_model(model_or_dir, dtype=torch.float64) if isinstance(model_or_dir, (str, Path))
             else model_or_dir)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _tolerance(reference: torch.Tensor, rounding: torch.dtype = torch.float32) -> float:
    """Bound on max |logit difference| of two float64 models whose weights differ by `rounding` (float32: the
    stored factors and bases) or only in the order of their float64 sums: gamma over the ROUNDED_TERMS
    each logit accumulates, times the logits' scale (tests/support/tolerance.py)."""
    tolerance = forward_tolerance(reference, ROUNDED_TERMS, rounding)
    assert tolerance <= WRONG_BY / 10, f"tolerance {tolerance:.2g} too close to a wiring error ({WRONG_BY})"
    return tolerance


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("basis", ["identity", "orthogonal"])
def test_full_rank_shared_basis_reproduces_dense(arch, basis, dense_dirs, workdir, input_ids, dense_logits):
    out = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"fr-{arch}-{basis}", basis=basis)
    dense = dense_logits(arch)
    compressed = _logits(out, input_ids)
    assert _max_diff(dense, compressed) <= _tolerance(dense)
    if basis == "identity":  # identity bases, unchanged factors: float64 rounding only
        assert _max_diff(dense, compressed) <= _tolerance(dense, torch.float64)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_reference_is_detected(arch, dense_dirs, workdir, input_ids, dense_logits):
    out = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"wrong-{arch}", basis="orthogonal", seed=3)
    dense = dense_logits(arch)
    model = load_reference_model(out, dtype=torch.float64)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, SharedBasisExperts)
    assert _max_diff(dense, _logits(model, input_ids)) <= _tolerance(dense)
    for wrong in ("input_basis", "output_basis"):  # A^T for A, B^T for B
        original = getattr(experts, wrong).data.clone()
        getattr(experts, wrong).data = original.T.contiguous()
        assert _max_diff(dense, _logits(model, input_ids)) > WRONG_BY, f"{wrong} transposed went unnoticed"
        getattr(experts, wrong).data = original
    experts.output_basis.data.zero_()  # the MoE output lost
    assert _max_diff(dense, _logits(model, input_ids)) > WRONG_BY


@pytest.mark.parametrize("arch", ARCHS)
def test_bank_checkpoint_equals_expanded_dense(arch, dense_dirs, workdir, input_ids, dense_logits):
    banked = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"bank-{arch}", bank_map=BANK_MAP,
                                        basis="orthogonal")
    expanded = write_expanded_dense_checkpoint(dense_dirs[arch], workdir / f"expanded-{arch}",
                                               bank_map=BANK_MAP)
    spec = read_moe_svd_config(banked).layer(0)
    assert spec.num_banks == 4 and spec.bank_map == BANK_MAP
    expanded_logits = _logits(expanded, input_ids)
    assert _max_diff(expanded_logits, _logits(banked, input_ids)) <= _tolerance(expanded_logits)
    # the map changes the model, so comparing with the original dense model would fail
    assert _max_diff(expanded_logits, dense_logits(arch)) > WRONG_BY


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a not in ARCHS])
def test_other_architectures_shared_basis_and_banks(arch, dense_dirs, workdir, input_ids, dense_logits):
    """Routing with shared experts (qwen2_moe, deepseek_v2), sparsemixer (phimoe), dense first layers."""
    dense = dense_logits(arch)
    full = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"other-{arch}", basis="orthogonal")
    assert _max_diff(dense, _logits(full, input_ids)) <= _tolerance(dense)
    banked = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"other-bank-{arch}", bank_map=BANK_MAP)
    expanded = write_expanded_dense_checkpoint(dense_dirs[arch], workdir / f"other-exp-{arch}",
                                               bank_map=BANK_MAP)
    expanded_logits = _logits(expanded, input_ids)
    assert _max_diff(expanded_logits, _logits(banked, input_ids)) <= _tolerance(expanded_logits)
    assert _max_diff(expanded_logits, dense) > WRONG_BY


@pytest.mark.parametrize("arch", ARCHS)
def test_per_expert_full_rank_reproduces_dense(arch, dense_dirs, workdir, input_ids, dense_logits):
    out = write_full_rank_checkpoint(dense_dirs[arch], workdir / f"pe-{arch}", form="per_expert",
                                     basis="orthogonal")
    dense = dense_logits(arch)
    assert _max_diff(dense, _logits(out, input_ids)) <= _tolerance(dense)


def test_full_rank_checkpoint_layout(dense_dirs, workdir):
    dense_dir = dense_dirs["mixtral"]
    out = write_full_rank_checkpoint(dense_dir, workdir / "layout", layers=[1, 2])
    config = read_config(out)
    dense_config = read_config(dense_dir)
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == [PLUGIN_ARCHITECTURES[a] for a in dense_config["architectures"]]
    block = read_moe_svd_config(out)
    assert block.method == "full-rank" and block.decomposed_layers == [1, 2]
    dims = moe_dims(config)
    spec = block.layer(1)
    assert spec.rank == dims.hidden
    layers = dense_config["num_hidden_layers"]
    assert block.params.expert_dense == layers * dense_layer_params(dims)
    assert block.params.expert_compressed == (
        (layers - 2) * dense_layer_params(dims) + 2 * decomposed_layer_params(spec, dims))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    names = CheckpointTensors(out).names()
    assert "model.layers.1.block_sparse_moe.moe_svd_in.weight" in names
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names  # layer 0 stays dense
    layer_1 = {n for n in names if n.startswith("model.layers.1.block_sparse_moe.")}
    expected = expected_layer_tensors("mixtral", 1, spec, dims, config.get("dtype") or config["torch_dtype"])
    assert layer_1 == set(expected) | {"model.layers.1.block_sparse_moe.gate.weight"}
    for side_file in (p.name for p in dense_dir.iterdir() if p.suffix not in (".safetensors",)
                      and p.name not in ("config.json", "model.safetensors.index.json")):
        assert (out / side_file).read_bytes() == (dense_dir / side_file).read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write_full_rank_checkpoint(dense_dir, out)
    with pytest.raises(ValueError, match="already a compressed checkpoint"):
        write_full_rank_checkpoint(out, workdir / "twice")


def test_expand_to_dense_state_dict_of_a_low_rank_checkpoint(dense_dirs, workdir, input_ids,
                                                             dense_logits):
    """A genuinely low-rank shared_basis checkpoint (r = 32 < H) equals its expansion loaded by transformers."""
    full = write_full_rank_checkpoint(dense_dirs["qwen3_moe"], workdir / "lr-full", basis="orthogonal")
    low = _edited_copy(full, workdir / "lr-low", _truncate_rank(32))
    expanded = write_dense_equivalent_checkpoint(low, workdir / "lr-expanded")
    assert read_moe_svd_config(expanded) is None
    assert len(expand_to_dense_state_dict(low)) == len(CheckpointTensors(dense_dirs["qwen3_moe"]).names())
    reference = _logits(low, input_ids)
    assert _max_diff(reference, _logits(expanded, input_ids)) <= _tolerance(reference)
    assert _max_diff(reference, dense_logits("qwen3_moe")) > WRONG_BY


# ---- errors -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_rank_qwen(dense_dirs, workdir) -> Path:
    return write_full_rank_checkpoint(dense_dirs["qwen3_moe"], workdir / "errors-base")


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint and apply `edit(tensors: dict, config: dict)` in place."""
    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(str(shard))
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(shard))
    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {name: shard.name for name in tensors}
        index_path.write_text(json.dumps(index))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _truncate_rank(rank: int):
    def edit(tensors, config):
        for key, spec in config["moe_svd"]["layers"].items():
            prefix = f"model.layers.{key}.mlp"
            tensors[f"{prefix}.moe_svd_in.weight"] = tensors[f"{prefix}.moe_svd_in.weight"][:rank].clone()
            tensors[f"{prefix}.moe_svd_out.weight"] = tensors[f"{prefix}.moe_svd_out.weight"][:, :rank].clone()
            for bank in range(max(spec["bank_map"]) + 1):
                for proj in ("gate_proj", "up_proj"):
                    name = f"{prefix}.experts.{bank}.{proj}.weight"
                    tensors[name] = tensors[name][:, :rank].clone()
                name = f"{prefix}.experts.{bank}.down_proj.weight"
                tensors[name] = tensors[name][:rank].clone()
            spec["rank"] = rank
    return edit


def test_missing_tensor_is_named(full_rank_qwen, workdir):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    broken = _edited_copy(full_rank_qwen, workdir / "missing", lambda t, c: t.pop(name))
    with pytest.raises(CheckpointError, match=r"decoder layer 2: tensor\(s\) .*experts\.5\.up_proj\.weight missing"):
        load_reference_model(broken)


def test_wrong_shape_is_named(full_rank_qwen, workdir):
    name = "model.layers.1.mlp.moe_svd_out.weight"
    broken = _edited_copy(full_rank_qwen, workdir / "shape",
                          lambda t, c: t.__setitem__(name, t[name][:, :32].clone()))
    with pytest.raises(CheckpointError, match=r"decoder layer 1, tensor .*moe_svd_out\.weight: "
                                              r"shape \[128, 32\] .*expected \[128, 128\]"):
        load_reference_model(broken)


def test_unexpected_tensor_is_named(full_rank_qwen, workdir):
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    extra = "model.layers.0.mlp.experts.9.gate_proj.weight"  # a bank the map does not use
    broken = _edited_copy(full_rank_qwen, workdir / "unexpected",
                          lambda t, c: t.__setitem__(extra, t[name].clone()))
    with pytest.raises(CheckpointError, match=r"decoder layer 0, tensor .*experts\.9\.gate_proj\.weight: unexpected"):
        load_reference_model(broken)


def test_unknown_format_version_is_refused(full_rank_qwen, workdir):
    broken = _edited_copy(full_rank_qwen, workdir / "version",
                          lambda t, c: c["moe_svd"].__setitem__("format_version", 99))
    with pytest.raises(SchemaError, match="format_version.*99.*not supported"):
        load_reference_model(broken)


# ---- perplexity -------------------------------------------------------------------------------------

TEXT = ("In the beginning the quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40)


def test_eval_ppl_dense_equals_full_rank(dense_dirs, workdir, dense_logits):
    from moesvd_vllm.cli import main as moesvd
    from offline.eval_ppl import evaluate_perplexity

    dense_dir = dense_dirs["qwen3_moe"]
    full = write_full_rank_checkpoint(dense_dir, workdir / "ppl-full", basis="orthogonal")
    seq_len, max_tokens = 64, 1000
    dense = evaluate_perplexity(dense_dir, TEXT, seq_len=seq_len, max_tokens=max_tokens, dtype=torch.float64)
    compressed = evaluate_perplexity(full, TEXT, seq_len=seq_len, max_tokens=max_tokens, dtype=torch.float64)
    assert dense.tokens == compressed.tokens == (max_tokens // seq_len) * (seq_len - 1)
    assert math.isfinite(dense.ppl) and dense.ppl > 1.0
    assert math.isclose(dense.ppl, math.exp(dense.nll))
    # |d log p| <= 2 max |d logit| for every token, so |d nll| and the relative ppl change are at most that
    logit_tolerance = _tolerance(dense_logits("qwen3_moe"))  # the same model's logit scale
    assert abs(compressed.nll - dense.nll) <= 2 * logit_tolerance
    assert compressed.ppl == pytest.approx(dense.ppl, rel=math.expm1(2 * logit_tolerance))

    data = workdir / "ppl.txt"
    data.write_text(TEXT, encoding="utf-8")
    out_json = workdir / "ppl.json"
    assert moesvd(["eval-ppl", str(dense_dir), str(full), "--data", str(data), "--seq-len", str(seq_len),
                   "--max-tokens", str(max_tokens), "--dtype", "float64", "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())["results"]
    assert [r["method"] for r in results] == ["dense", "full-rank"]
    same_computation = 2 * _tolerance(dense_logits("qwen3_moe"), torch.float64)  # float64 rounding only
    assert results[0]["ppl"] == pytest.approx(dense.ppl, rel=same_computation)
    assert results[1]["tokens"] == dense.tokens


def test_windows_count_tokens_exactly():
    from offline.eval_ppl import make_windows

    ids = list(range(10, 60))  # 50 tokens
    plain = make_windows(ids, seq_len=16, max_tokens=40, bos_token_id=None)
    assert plain.input_ids.tolist()[1] == list(range(26, 42)) and plain.scored_tokens == 2 * 15
    with_bos = make_windows(ids, seq_len=16, max_tokens=None, bos_token_id=0)
    assert with_bos.input_ids.shape == (3, 17) and with_bos.scored_tokens == 3 * 16
    assert with_bos.input_ids[:, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids, seq_len=64, max_tokens=None, bos_token_id=None)


def test_dense_checkpoint_with_a_missing_tensor_is_refused(dense_dirs, workdir):
    name = "model.layers.3.self_attn.o_proj.weight"
    broken = _edited_copy(dense_dirs["qwen3_moe"], workdir / "dense-missing", lambda t, c: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing_keys.*layers\.3\.self_attn\.o_proj"):
        load_reference_model(broken)


def test_fused_expert_tensors_are_read(dense_dirs, workdir, input_ids, dense_logits):
    """A dense checkpoint storing transformers 5's fused experts ([E, 2I, H] / [E, H, I]) converts too."""
    def fuse(tensors, config):
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.mlp.experts"
            gate, up, down = ([tensors.pop(f"{prefix}.{e}.{proj}.weight") for e in range(8)]
                              for proj in ("gate_proj", "up_proj", "down_proj"))
            tensors[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            tensors[f"{prefix}.down_proj"] = torch.stack(down)

    fused = _edited_copy(dense_dirs["qwen3_moe"], workdir / "fused", fuse)
    dense = dense_logits("qwen3_moe")
    full = write_full_rank_checkpoint(fused, workdir / "fused-full", basis="orthogonal")
    assert "model.layers.0.mlp.moe_svd_in.weight" in CheckpointTensors(full).names()
    assert _max_diff(dense, _logits(full, input_ids)) <= _tolerance(dense)


# ---- the newer architectures, compressed by the real compressor ----------------------

# sigmoid scores, grouped choice, correction bias, scaling (deepseek_v3, glm4_moe); hybrid linear attention
# layers that the layer-wise pipeline must feed their own mask (qwen3_next)
ROUTER_ARCHS = ["deepseek_v3", "glm4_moe", "qwen3_next"]
COMPRESS_CALIB = Path(__file__).resolve().parent.parent / "offline" / "bundled" / "kjv_text" / "validation.txt"


@pytest.mark.parametrize("method,ratio,ratio_tolerance", [
    ("moe-svd-stacked", 0.3, 0.01),
    pytest.param("moe-svd", 0.33, 0.05, marks=pytest.mark.slow),  # U-trimming: coarse ratio steps
])
@pytest.mark.parametrize("arch", ROUTER_ARCHS)
def test_compressed_checkpoint_of_a_routed_architecture_is_evaluated_by_the_reference(
        arch, method, ratio, ratio_tolerance, dense_dirs, workdir, input_ids, dense_logits):
    """`compress` calibrates through the architecture's own block, and the reference (the original block
    with only `experts` replaced) computes what plain transformers computes on the expanded dense
    equivalent: routing, correction bias, scaling and shared experts stay the block's own."""
    from offline.compress import CompressionOptions, compress
    from offline.eval_ppl import evaluate_perplexity

    options = CompressionOptions(ratio=ratio, calib=str(COMPRESS_CALIB), method=method, num_samples=8,
                                 seq_len=32, batch_size=4, intermediate_step=8, ratio_tolerance=ratio_tolerance)
    out = compress(dense_dirs[arch], workdir / f"compressed-{arch}-{method}", options)
    block = read_moe_svd_config(out)
    assert block.decomposed_layers and abs(block.params.ratio - ratio) <= ratio_tolerance
    reference = _logits(out, input_ids)
    assert torch.isfinite(reference).all()
    expanded = write_dense_equivalent_checkpoint(out, workdir / f"compressed-{arch}-{method}-expanded")
    assert _max_diff(reference, _logits(expanded, input_ids)) <= _tolerance(reference)
    assert _max_diff(reference, dense_logits(arch)) > WRONG_BY  # the experts did change
    ppl = evaluate_perplexity(out, TEXT, seq_len=64, max_tokens=256)
    assert math.isfinite(ppl.ppl) and ppl.ppl > 1.0
