"""Group-wise bases (`--basis-groups`, format version 4): what the compressor writes, what the PyTorch
reference computes, and the errors for options that cannot work. Serving: tests/test_plugin.py
(`test_group_wise_bases_match_reference`, real vLLM servers against the reference)."""

from __future__ import annotations

import pytest
import torch

from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.schema import read_moe_svd_config
from offline.compress import CompressionOptions, OptionsError, compress
from tests.test_compress import CALIB, SMALL


def _options(**kwargs) -> CompressionOptions:
    return CompressionOptions(**{"calib": str(CALIB), "ratio": 0.5, "ratio_tolerance": 0.05, **SMALL, **kwargs})


@pytest.fixture(scope="module")
def grouped(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped") / "out"
    return compress(tiny_model_dir("qwen3_moe"), out,
                    _options(basis_groups=8, min_intermediate_fraction=1.0, propagate="dense"))  # G = E


def test_group_wise_checkpoint_stacks_one_pair_of_bases_per_group(grouped):
    config = read_moe_svd_config(grouped)
    assert config.format_version == 4
    for spec in config.layers.values():
        assert spec.basis_groups == 8 and spec.bases and spec.num_banks == 8
    assert 0.45 <= config.params.ratio <= 0.55


def test_reference_runs_each_expert_in_its_groups_rank_space(grouped):
    """The reference's routed forward (group slices of the stacked latents) equals each expert's dense
    equivalent B_g D_e act(G_e A_g x) (`dense_weights`), expert by expert; float32 GEMMs on O(1) values."""
    from offline.reference import SharedBasisExperts, load_reference_model

    model = load_reference_model(grouped)
    modules = [m for m in model.modules() if isinstance(m, SharedBasisExperts)]
    assert modules and all(m.groups == 8 for m in modules)
    x = torch.randn(6, modules[0].input_basis.shape[1], generator=torch.Generator().manual_seed(0))
    for module in modules:
        gate, up, down = module.dense_weights()
        for e in range(module.num_experts):
            dense = (torch.nn.functional.silu(x.double() @ gate[e].T) * (x.double() @ up[e].T)) @ down[e].T
            routed = module(x, torch.full((6, 1), e), torch.ones(6, 1)).double()
            assert torch.allclose(routed, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max())), e


def test_group_wise_bases_fit_the_experts_better_than_one_shared_pair(tiny_model_dir, tmp_path, grouped):
    """At the same rank (32), bases fitted per expert reproduce the experts' calibrated outputs more closely
    than one pair shared by all eight (the reports' whitened relative errors). Both runs pass the dense
    layers' outputs on (`propagate="dense"`), so every layer sees the same calibration inputs in both."""
    import json

    # one shared pair at rank 32 in all four layers: 1 - (2 r H + 3 E I r) / (3 E I H) = 0.729
    shared = compress(tiny_model_dir("qwen3_moe"), tmp_path / "shared",
                      _options(min_intermediate_fraction=1.0, ratio=0.729, ratio_tolerance=0.01, selection="all",
                               propagate="dense"))
    reports = {name: {row["layer"]: row for row in json.loads((path / "report.json").read_text())["layers"]}
               for name, path in (("grouped", grouped), ("shared", shared))}
    layers = [i for i, row in reports["grouped"].items() if row["decomposed"] and row["rank"] == 32]
    assert layers, "the grouped fixture should have a layer at rank 32"
    for index in layers:
        assert reports["shared"][index]["rank"] == 32
        for projection in ("gate", "up", "down"):
            grouped_error = reports["grouped"][index]["relative_error"][projection]
            assert grouped_error < reports["shared"][index]["relative_error"][projection], (index, projection)


def test_basis_groups_must_divide_the_experts(tiny_model_dir, tmp_path):
    with pytest.raises(MoESVDError, match="--basis-groups 3 does not divide the 8 routed experts"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", _options(basis_groups=3))
    assert not (tmp_path / "out" / "config.json").exists()


def test_trimming_groups_must_lie_inside_basis_groups(tiny_model_dir, tmp_path):
    with pytest.raises(MoESVDError, match="U-trimming groups of 8 experts do not lie inside basis groups of 4"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out", _options(method="moe-svd", basis_groups=2))


def test_basis_groups_need_a_shared_basis_method():
    with pytest.raises(OptionsError, match="basis_groups > 1 .* needs a shared-basis method, not 'svd'"):
        _options(method="svd", basis_groups=2)


def _rows_in_uneven_groups(dtype: torch.dtype):
    """12 rows over 6 groups: group 1 five rows (the float32-converted path on CPUs without native bf16),
    groups 0, 3 and 4 one row each (bf16 GEMVs), groups 2 and 5 none; weights a transposed view of
    row-major [G, D_out, D_in] matrices, as the plugin passes them."""
    generator = torch.Generator().manual_seed(0)
    group = torch.tensor([1, 0, 1, 3, 1, 1, 4, 1, 3, 0, 4, 1])
    rows = torch.randn(group.numel(), 64, generator=generator).to(dtype)
    weights = torch.randn(6, 48, 64, generator=generator).to(dtype).transpose(1, 2)
    return rows, group, weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_group_matmul_multiplies_each_row_by_its_groups_matrix(dtype):
    """Against float64 row by row. The inputs are exact in `dtype`, every path accumulates in float32, so
    the error is the output's rounding to `dtype` (half an ulp, relative 2^-8 in bf16, 2^-23 in float32)
    plus float32 accumulation over 64 terms of O(1) products (under 1e-4)."""
    from moesvd_vllm.grouped_bases import _padded_batched_matmul, rowwise_group_matmul

    rows, group, weights = _rows_in_uneven_groups(dtype)
    expected = torch.stack([rows[p].double() @ weights[g].double() for p, g in enumerate(group.tolist())])
    relative = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23
    for product in (rowwise_group_matmul(rows, group, weights), _padded_batched_matmul(rows, group, weights)):
        assert product.dtype == dtype and product.shape == (12, 48)
        error = (product.double() - expected).abs()
        assert bool((error <= relative * expected.abs() + 1e-4).all()), float(error.max())


def test_rowwise_group_matmul_is_a_valid_custom_op():
    """torch.library's own checks (fake tensor shapes, schema, autograd registration) that torch.compile
    relies on when vLLM traces the MoE method on CPU; and no rows give an empty result."""
    from moesvd_vllm.grouped_bases import rowwise_group_matmul

    rows, group, weights = _rows_in_uneven_groups(torch.bfloat16)
    torch.library.opcheck(rowwise_group_matmul, (rows, group, weights))
    empty = rowwise_group_matmul(rows[:0], group[:0], weights)
    assert empty.shape == (0, 48)
