"""`--down-fit outputs`: each expert's down factor fitted to the dense expert's output from the activations
of its compressed gate and up (offline/decompose.py `fit_output_factor_to_outputs`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.format.schema import read_moe_svd_config
from offline.compress import CompressionOptions, OptionsError, compress
from offline.compression_options import DOWN_FITS

from offline import decompose as dec
from offline.calibration import gram
from tests.support.tolerance import assert_within, gamma, solve_bound


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    scales = torch.logspace(0.5, -1.5, width, dtype=torch.float64)
    return torch.randn(tokens, width, generator=_generator(seed), dtype=torch.float64) * scales


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=_generator(seed), dtype=torch.float64))[0]


def test_cross_gram_is_the_weighted_product_of_the_two_row_sets():
    x, z = _activations(300, 12, 1), _activations(300, 7, 2)
    scale = torch.rand(300, generator=_generator(3), dtype=torch.float64)
    expected = (x * scale[:, None] ** 2).T @ z
    # float32 chunks summed in float64: each entry sums T products of float32-rounded values
    bound = 4 * gamma(300, torch.float32) * float(((x * scale[:, None]).abs().T @ (z * scale[:, None]).abs()).max())
    assert float((gram(x, scale, [100, 200], other=z) - expected).abs().max()) <= bound
    assert torch.equal(gram(x, scale, [100, 200]), gram(x, scale, [100, 200], other=x))


def test_with_unchanged_activations_it_is_the_projection_of_the_weight():
    h = _activations(400, 16, 4)
    w = torch.randn(10, 16, generator=_generator(5), dtype=torch.float64)
    basis = _orthonormal(10, 4, 6)
    c = h.T @ h
    fitted = dec.fit_output_factor_to_outputs(w, basis, c, c)
    expected = dec.fit_output_factor(w, basis)
    # one Cholesky solve of C against W C (formed from T products per entry)
    solution = float(torch.linalg.norm(w))
    bound = solve_bound(solution, float(torch.linalg.cond(c)), h.shape[0])
    assert_within(fitted, expected, bound, "D with h' = h")


def test_it_solves_the_least_squares_problem_and_beats_the_weight_projection():
    """h' = h with the error a compressed gate/up leaves; D must satisfy the normal equations of
    min ||B D h' - W h||^2 and give a lower output error than D = B^T W (which ignores the error)."""
    h = _activations(500, 16, 7)
    h_fitted = h + 0.3 * _activations(500, 16, 8) @ torch.randn(16, 16, generator=_generator(9), dtype=torch.float64)
    w = torch.randn(10, 16, generator=_generator(10), dtype=torch.float64)
    for basis in (_orthonormal(10, 4, 11), None):
        d = dec.fit_output_factor_to_outputs(w, basis, h.T @ h_fitted, h_fitted.T @ h_fitted)
        b = torch.eye(10, dtype=torch.float64) if basis is None else basis
        residual = b @ d @ h_fitted.T - w @ h.T  # [H, T]
        normal = b.T @ residual @ h_fitted  # the gradient: zero at the optimum
        c = h_fitted.T @ h_fitted
        # the solve's error in D (solve_bound), times C', plus forming both products (T terms each)
        d_error = solve_bound(float(torch.linalg.norm(d)), float(torch.linalg.cond(c)), h.shape[0])
        terms = b.T.abs() @ ((b @ d).abs() @ c.abs() + w.abs() @ (h.T.abs() @ h_fitted.abs()))
        bound = d_error * float(torch.linalg.norm(c)) + 2 * gamma(h.shape[0], torch.float64) * float(terms.max())
        assert float(normal.abs().max()) <= bound, basis is None
        projected = b @ b.T @ w @ h_fitted.T - w @ h.T
        assert float(residual.norm()) < 0.9 * float(projected.norm()), basis is None


# ------------------------------------------------------------------------------------------ the pipeline
CALIB = Path(__file__).resolve().parent.parent / "offline" / "bundled" / "kjv_text" / "validation.txt"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4)


def _layer_tensors(out: Path, layer: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(f"model.layers.{layer}.mlp.")})
    return tensors


def test_output_fit_lowers_every_layers_expert_output_error_and_changes_only_down(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("qwen3_moe")
    runs = {fit: compress(dense, tmp_path / fit, CompressionOptions(ratio=0.6, calib=str(CALIB), down_fit=fit,
                                                                    **SMALL))
            for fit in DOWN_FITS}
    assert read_moe_svd_config(runs["outputs"]).options["down_fit"] == "outputs"
    layers = json.loads((runs["outputs"] / "report.json").read_text())["layers"]
    with_bases = [x for x in layers if x["decomposed"]]
    assert with_bases and all(read_moe_svd_config(runs["outputs"]).layers[str(x["layer"])].bases for x in with_bases)
    for x in with_bases:  # the refit minimises exactly this error on the calibration tokens
        error = x["relative_error"]
        assert 0 < error["down_outputs"] < error["down_outputs_weight_fit"], x["layer"]
    # the first decomposed layer sees the same calibration inputs in both runs: only the down factors differ
    first = min(x["layer"] for x in with_bases)
    weights, outputs = (_layer_tensors(runs[fit], first) for fit in DOWN_FITS)
    assert weights.keys() == outputs.keys()
    for name in weights:
        same = torch.equal(weights[name], outputs[name])
        assert same != name.endswith("down_proj.weight"), name


def test_unknown_down_fit_is_a_clear_error():
    with pytest.raises(OptionsError, match="down_fit 'activations' is not one of"):
        CompressionOptions(ratio=0.3, calib=str(CALIB), down_fit="activations")
