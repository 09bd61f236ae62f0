"""The math of offline.decompose / offline.sensitivity / offline.calibration statistics, on small matrices."""

from __future__ import annotations

import logging

import pytest
import torch

from moesvd_vllm.architectures import MoEDims

from moesvd_vllm.format.schema import LayerSpec, decomposed_layer_params, dense_layer_params
from offline import decompose as dec
from offline.calibration import ExpertStatistics, ExpertStatisticsHook
from offline.calibration_data import sample_windows, CalibrationError
from offline.sensitivity import (
    LayerShape,
    RatioError,
    layer_sensitivity,
    monotone_levels,
    plan_decomposition,
    shape_levels,
)
from tests.support.models import tiny_qwen3_moe_block
from tests.support.tolerance import assert_within, gamma, gram_bound, solve_bound, swiglu_bound


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(tokens: int, dim: int, seed: int = 1, mix_seed: int = 0) -> torch.Tensor:
    """Correlated, anisotropic inputs (like real activations): a few directions dominate. Experts of
    one layer read the same residual stream: same `mix_seed` (distribution), different tokens (`seed`)."""
    scales = torch.logspace(1, -2, dim, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=_generator(mix_seed), dtype=torch.float64))[0]
    return (torch.randn(tokens, dim, generator=_generator(seed + 1000), dtype=torch.float64) * scales) @ mix.T


def test_full_rank_svd_reproduces_the_weight():
    w = torch.randn(24, 16, generator=_generator(), dtype=torch.float64)
    x = _inputs(200, 16)
    s = dec.whitening_factor(x.T @ x, "test")
    for whitening in (None, s):
        approx = dec.truncated_svd(w, 16, whitening).dense()
        condition = 1.0 if whitening is None else float(torch.linalg.cond(whitening))  # W S, then S^{-1}
        bound = solve_bound(float(torch.linalg.matrix_norm(w, 2)), condition, max(w.shape))
        assert_within(approx, w, bound, f"full-rank SVD (whitened: {whitening is not None})")


def test_whitened_svd_has_lower_output_error_than_plain_svd():
    w = torch.randn(32, 24, generator=_generator(), dtype=torch.float64)
    x = _inputs(500, 24)
    s = dec.whitening_factor(x.T @ x, "test")
    for rank in (4, 8, 12):
        plain = dec.truncated_svd(w, rank).dense()
        whitened = dec.truncated_svd(w, rank, s).dense()
        err_plain = torch.linalg.norm((w - plain) @ x.T)
        err_whitened = torch.linalg.norm((w - whitened) @ x.T)
        assert err_whitened < 0.9 * err_plain, (rank, float(err_whitened), float(err_plain))


def test_whitened_error_matches_direct_computation():
    w = torch.randn(8, 6, generator=_generator(), dtype=torch.float64)
    approx = w + 0.1 * torch.randn(8, 6, generator=_generator(3), dtype=torch.float64)
    x = _inputs(50, 6)
    num, den = dec.whitened_error(w, approx, x.T @ x)

    def bound(m):  # each side sums T x H products and H^2 Gram terms of |m| |x| (Higham 3.1), three roundings
        terms = x.shape[0] + x.shape[1] ** 2
        return 3 * gamma(terms, torch.float64) * float((m.abs() @ x.abs().T).pow(2).sum())

    direct = float(torch.linalg.norm((w - approx) @ x.T) ** 2)
    assert num == pytest.approx(direct, rel=0, abs=bound(w - approx))
    assert den == pytest.approx(float(torch.linalg.norm(w @ x.T) ** 2), rel=0, abs=bound(w))


def test_singular_gram_is_repaired_and_logged(caplog):
    x = _inputs(5, 12)  # 5 tokens in 12 dimensions: rank-deficient Gram
    with caplog.at_level(logging.WARNING, logger="offline.decompose"):
        s = dec.whitening_factor(x.T @ x, "layer 7 expert 3")
    assert torch.isfinite(s).all()
    assert "layer 7 expert 3" in caplog.text and "repaired" in caplog.text


@pytest.mark.parametrize("bad", ["nan", "zeros"])
def test_gram_beyond_repair_raises_a_clear_error(bad):
    gram = torch.eye(4, dtype=torch.float64)
    if bad == "nan":
        gram[1, 2] = float("nan")
    else:
        gram = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(dec.WhiteningError, match="layer 2 expert 0"):
        dec.whitening_factor(gram, "layer 2 expert 0")


def test_sensitivity_matches_hand_computation():
    f = torch.tensor([0.5, 0.25, 0.25, 1.0])
    r = torch.tensor([10.0, 20.0, 30.0, 4.0])
    a = torch.tensor([0.1, 0.2, 0.0, 0.5])
    # 0.5*10*0.1 + 0.25*20*0.2 + 0.25*30*0 + 1*4*0.5 = 0.5 + 1 + 0 + 2
    # float32 inputs (0.1, 0.2 rounded), two products and three sums of positive terms: gamma_8 relative
    assert layer_sensitivity(f, r, a) == pytest.approx(3.5, rel=gamma(8, torch.float32))


def test_principal_rank_counts_singular_values_above_threshold():
    u = torch.linalg.qr(torch.randn(10, 10, generator=_generator(), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(6, 6, generator=_generator(2), dtype=torch.float64))[0]
    sigma = torch.tensor([5.0, 2.0, 0.5, 0.04, 0.01, 0.0], dtype=torch.float64)
    w = u[:, :6] @ torch.diag(sigma) @ v.T
    assert dec.principal_rank(w, 0.01) == 3  # above 0.05: 5, 2, 0.5
    assert dec.principal_rank(w, 0.001) == 5


def _experts(num_experts: int, out: int, hidden: int, seed: int = 0) -> list[torch.Tensor]:
    g = _generator(seed)
    shared = torch.randn(out, hidden, generator=g, dtype=torch.float64)
    return [shared + 0.5 * torch.randn(out, hidden, generator=g, dtype=torch.float64) for _ in range(num_experts)]


def test_shared_basis_with_full_rank_reproduces_each_expert_exactly():
    hidden, inter, num = 16, 12, 4
    gate_up = _experts(num, 2 * inter, hidden)
    down = _experts(num, hidden, inter, seed=5)
    grams_in = [(lambda x: x.T @ x)(_inputs(40, hidden, seed=e)) for e in range(num)]
    grams_mid = [(lambda y: y.T @ y)(_inputs(40, inter, seed=10 + e)) for e in range(num)]
    counts = torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=torch.float64)
    layer_gram = sum(grams_in)
    basis_in = dec.stacked_input_basis(gate_up, counts, layer_gram, hidden, "test")
    basis_out = dec.stacked_output_basis(down, grams_mid, hidden)
    for e in range(num):  # the input fit solves A C A^T (condition of C); B is orthonormal (condition 1)
        fitted = dec.fit_input_factor(gate_up[e], basis_in, grams_in[e]) @ basis_in
        in_bound = solve_bound(float(torch.linalg.matrix_norm(gate_up[e], 2)),
                               float(torch.linalg.cond(grams_in[e])), hidden)
        assert_within(fitted, gate_up[e], in_bound, f"input fit of expert {e}")
        out_bound = solve_bound(float(torch.linalg.matrix_norm(down[e], 2)), 1.0, hidden)
        refit = basis_out @ dec.fit_output_factor(down[e], basis_out)
        assert_within(refit, down[e], out_bound, f"output fit of expert {e}")


def _weighted_input_error(weights, grams, basis):
    total = 0.0
    for w, c in zip(weights, grams):
        approx = dec.fit_input_factor(w, basis, c) @ basis
        total += dec.whitened_error(w, approx, c)[0]
    return total


def test_stacked_bases_beat_the_most_frequent_experts_bases():
    hidden, inter, num, rank = 24, 10, 6, 8
    gate_up = _experts(num, 2 * inter, hidden)
    down = _experts(num, hidden, inter, seed=4)
    xs = [_inputs(60, hidden, seed=e) for e in range(num)]
    ys = [_inputs(60, inter, seed=20 + e) for e in range(num)]
    grams_in, grams_mid = [x.T @ x for x in xs], [y.T @ y for y in ys]
    counts = torch.full((num,), 60.0, dtype=torch.float64)
    stacked_in = dec.stacked_input_basis(gate_up, counts, sum(grams_in), rank, "test")
    stacked_out = dec.stacked_output_basis(down, grams_mid, rank)
    paper_in, paper_out = dec.most_frequent_expert_bases(gate_up[0], down[0], grams_in[0], grams_mid[0],
                                                         rank, "test")
    assert _weighted_input_error(gate_up, grams_in, stacked_in) < _weighted_input_error(gate_up, grams_in, paper_in)

    def out_error(basis):
        return sum(dec.whitened_error(w, basis @ dec.fit_output_factor(w, basis), c)[0]
                   for w, c in zip(down, grams_mid))

    assert out_error(stacked_out) < out_error(paper_out)


def test_trimming_keeps_the_most_frequent_experts_and_maps_to_the_nearest():
    freq = torch.tensor([0.1, 0.5, 0.05, 0.4, 0.3, 0.02, 0.6, 0.03])
    distance = torch.ones(8, 8)
    distance[0, 3] = 0.1  # expert 0 is closest to kept expert 3
    distance[2, 1] = 0.2
    distance[5, 6] = 0.1
    distance[7, 4] = 0.1
    bank_map, kept = dec.trimming_bank_map(freq, keep_per_group=2, group_size=4, distance=distance)
    assert kept == [1, 3, 4, 6]  # group 0-3: experts 1, 3; group 4-7: experts 6, 4
    assert bank_map == [1, 0, 0, 1, 2, 3, 3, 2]


def _levels(dims, form, min_intermediate_fraction=1.0, step=32):
    max_rank = dims.hidden if form == "shared_basis" else min(dims.hidden, dims.intermediate)
    candidates = shape_levels(hidden=dims.hidden, intermediate=dims.intermediate, rank_step=step,
                              max_rank=max_rank, intermediate_step=8,
                              min_intermediate_fraction=min_intermediate_fraction)

    def params(shape):
        spec = LayerSpec(form, shape.rank, dims.num_experts, list(range(dims.num_experts)),
                         intermediate=None if shape.intermediate == dims.intermediate else shape.intermediate,
                         bases=shape.bases)
        return decomposed_layer_params(spec, dims)

    return monotone_levels(candidates, params, dense_layer_params(dims)), params


@pytest.mark.parametrize("form,fraction,step,all_layers", [
    ("shared_basis", 1.0, 32, False),  # the paper's rank-only reduction, selective
    ("shared_basis", 0.5, 32, False),  # the default: intermediate neurons first, then rank
    ("per_expert", 1.0, 1, True),  # baselines: every layer, any rank
])
def test_plan_meets_the_requested_ratio_within_one_point(form, fraction, step, all_layers):
    dims = MoEDims(num_experts=8, top_k=2, hidden=256, intermediate=192)
    sensitivity = {i: float(s) for i, s in enumerate([5, 1, 3, 2, 4, 6, 0.5, 7])}
    levels, params = _levels(dims, form, fraction, step)
    dense = dense_layer_params(dims)
    for ratio in (0.2, 0.3, 0.4, 0.5, 0.6):
        plan = plan_decomposition(sensitivity, ratio, dense_layer=dense, levels=levels, layer_params=params,
                                  tolerance=0.01, min_kept_fraction=0.5, decompose_all=all_layers)
        removed = sum(dense - params(shape) for shape in plan.shapes.values()) / (dense * 8)
        assert abs(removed - ratio) <= 0.01, (ratio, plan)
        assert plan.ratio == pytest.approx(removed)
        assert all(shape.rank % step == 0 for shape in plan.shapes.values())
        assert all(shape.intermediate % 8 == 0 for shape in plan.shapes.values())
        if not all_layers and len(plan.shapes) < 8:  # selective: the least sensitive layers first
            kept = set(sensitivity) - set(plan.shapes)
            assert max(sensitivity[i] for i in plan.shapes) <= min(sensitivity[i] for i in kept)


def test_default_levels_reduce_neurons_first_then_rank():
    dims = MoEDims(num_experts=8, top_k=2, hidden=128, intermediate=256)
    levels, params = _levels(dims, "shared_basis", 0.5)
    assert levels[0] == LayerShape(128, 248, bases=False)
    assert [s.intermediate for s in levels if not s.bases] == list(range(248, 127, -8))
    assert [(s.rank, s.intermediate) for s in levels if s.bases] == [(96, 128), (64, 128), (32, 128)]
    costs = [params(s) for s in levels]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)  # strictly decreasing


def test_levels_skip_shapes_that_do_not_remove_parameters():
    # a wide hidden size with many experts: adding the two [H, r] bases at r = H - 32 costs more than the
    # 32 ranks save, so that level is dropped
    dims = MoEDims(num_experts=2, top_k=1, hidden=2048, intermediate=64)
    levels, params = _levels(dims, "shared_basis", 0.5)
    costs = [params(s) for s in levels]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert all(c < dense_layer_params(dims) for c in costs)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_zero_one_is_rejected(ratio):
    with pytest.raises(RatioError, match="strictly between 0 and 1"):
        plan_decomposition({0: 1.0}, ratio, dense_layer=100, levels=[LayerShape(32, 16)],
                           layer_params=lambda s: 50, tolerance=0.01, min_kept_fraction=0.5,
                           decompose_all=False)


def test_unreachable_ratio_is_rejected():
    # one layer of 100 parameters; rank 64 costs 90, rank 32 costs 60: removable 10 % or 40 % only
    levels = [LayerShape(64, 16), LayerShape(32, 16)]
    with pytest.raises(RatioError, match="not reachable"):
        plan_decomposition({0: 1.0}, 0.25, dense_layer=100, levels=levels,
                           layer_params=lambda s: 30 + 30 * (s.rank // 32), tolerance=0.01,
                           min_kept_fraction=0.5, decompose_all=False)


def _tiny_moe_block():
    return tiny_qwen3_moe_block(32, 16, 4)


def _run_stats(block, hidden, mask):
    stats = ExpertStatistics(4, 32, 16)
    hook = ExpertStatisticsHook(stats, block.experts)
    hook.token_mask = mask.reshape(-1)
    with torch.no_grad():
        block(hidden)
    hook.remove()
    return stats


def test_padding_never_counts_in_routing_frequency_or_grams():
    block = _tiny_moe_block()
    g = _generator(3)
    real = torch.randn(2, 6, 32, generator=g)
    padded = torch.cat([real, 10 * torch.randn(2, 4, 32, generator=g)], dim=1)  # 4 pad positions each
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], dim=1).bool()
    unpadded = _run_stats(block, real, torch.ones(2, 6, dtype=torch.bool))
    with_padding = _run_stats(block, padded, mask)
    assert with_padding.total_tokens == unpadded.total_tokens == 12
    assert torch.equal(with_padding.routed_tokens, unpadded.routed_tokens)
    assert int(with_padding.routed_tokens.sum()) == 12 * 2  # top-2 of 12 real tokens
    assert torch.allclose(with_padding.frequency, unpadded.frequency)
    # both are float32 Grams of the same real rows: each within its rounding bound of the exact Gram
    bound_in, bound_mid = [], []
    for e in range(4):
        rows, _ = unpadded.routed.expert_rows(e)
        weight = block.experts.gate_up_proj[e].detach()
        gate, up = (rows.double() @ weight.double().T).chunk(2, dim=-1)
        bound_in.append(2 * gram_bound(rows, torch.float32))
        bound_mid.append(2 * gram_bound(torch.nn.functional.silu(gate) * up, torch.float32,
                                        swiglu_bound(rows, weight)))
    assert_within(with_padding.gram_in, unpadded.gram_in, torch.stack(bound_in), "input Grams")
    assert_within(with_padding.gram_mid, unpadded.gram_mid, torch.stack(bound_mid), "mid Grams")
    # and the mask matters: counting the pad positions gives other statistics, far outside that bound
    counted_pads = _run_stats(block, padded, torch.ones(2, 10, dtype=torch.bool))
    assert counted_pads.total_tokens == 20
    assert ((counted_pads.gram_in - unpadded.gram_in).abs() > 100 * torch.stack(bound_in)).any()


def test_outlier_ratio_counts_activations_above_tau_times_mean():
    block = _tiny_moe_block()
    hidden = torch.randn(1, 20, 32, generator=_generator(4))
    mask = torch.ones(1, 20, dtype=torch.bool)
    stats = _run_stats(block, hidden, mask)
    hook = ExpertStatisticsHook(stats, block.experts)
    hook.outlier_threshold = 2.0 * stats.mean_abs_activation
    hook.token_mask = mask.reshape(-1)
    with torch.no_grad():
        block(hidden)
    hook.remove()
    # by hand: the activations of each expert on its routed tokens
    _, _, top_k = block.gate(hidden.reshape(-1, 32))
    from offline.calibration import expert_activations

    for e in range(4):
        routed = (top_k == e).any(-1)
        act = expert_activations(block.experts, e, hidden.reshape(-1, 32)[routed]).abs()
        expected = float((act > 2.0 * act.mean()).double().mean()) if routed.any() else 0.0
        assert float(stats.outlier_ratio()[e]) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_calibration_sampling_is_seeded_and_rejects_short_text():
    tokens = torch.arange(1000)
    a = sample_windows(tokens, 4, 64, seed=7, source="x")
    b = sample_windows(tokens, 4, 64, seed=7, source="x")
    c = sample_windows(tokens, 4, 64, seed=8, source="x")
    assert torch.equal(a.input_ids, b.input_ids) and a.info.sha256 == b.info.sha256
    assert a.info.sha256 != c.info.sha256
    with pytest.raises(CalibrationError, match="shorter than one sample"):
        sample_windows(torch.arange(50), 4, 64, seed=0, source="short.txt")
