"""Per-expert Grams formed on demand from the kept routed inputs equal the ones accumulated per batch
(the compressor's memory fix: no [E, H, H] accumulator), and the fit's error terms equal the direct
whitened error."""

from __future__ import annotations

import copy

import pytest
import torch

from offline import decompose as dec
from offline.calibration import ExpertStatistics, ExpertStatisticsHook, expert_activations
from tests.support.models import tiny_qwen3_moe_block
from tests.support.tolerance import assert_within, gamma, gram_bound, swiglu_bound, unit_roundoff

NUM_EXPERTS, HIDDEN, INTERMEDIATE = 6, 32, 16


def _tiny_moe_block():
    return tiny_qwen3_moe_block(HIDDEN, INTERMEDIATE, NUM_EXPERTS)


def _accumulated_reference(block, batches, routing_weighted: bool):
    """The per-batch accumulation the compressor did before (one [E, H, H] accumulator), here exact: all in
    float64, the activations too. Also returns elementwise bounds on the float32 pipeline's rounding error
    (float32 activations and Gram GEMMs), as {"in": [E, H, H], "mid": [E, I, I], "layer": [H, H]}."""
    seen = []
    handle = block.experts.register_forward_pre_hook(lambda module, args: seen.append(args[:3]))
    with torch.no_grad():
        for hidden, _ in batches:
            block(hidden)
    handle.remove()
    experts64 = copy.deepcopy(block.experts).double()
    u = unit_roundoff(torch.float32)
    gram_in = torch.zeros(NUM_EXPERTS, HIDDEN, HIDDEN, dtype=torch.float64)
    gram_mid = torch.zeros(NUM_EXPERTS, INTERMEDIATE, INTERMEDIATE, dtype=torch.float64)
    gram_layer = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    rows = {"in": [[] for _ in range(NUM_EXPERTS)], "mid": [[] for _ in range(NUM_EXPERTS)], "layer": []}
    for (x_all, index_all, weight_all), (_, mask) in zip(seen, batches):
        real = mask.reshape(-1)
        x_all, index_all, weight_all = x_all[real], index_all[real], weight_all[real]
        gram_layer += x_all.double().T @ x_all.double()
        rows["layer"].append((x_all.double(), torch.zeros(x_all.shape, dtype=torch.float64)))
        for e in range(NUM_EXPERTS):
            routed = (index_all == e).any(dim=-1)
            if not routed.any():
                continue
            x = x_all[routed]
            with torch.no_grad():
                a = expert_activations(experts64, e, x.double())
                a_error = swiglu_bound(x, block.experts.gate_up_proj[e])
            x = x.double()
            x_error = torch.zeros_like(x)
            if routing_weighted:  # float32 scales each row: one more rounding
                w = (weight_all[routed] * (index_all[routed] == e)).sum(-1).double()[:, None]
                x, a, a_error = x * w, a * w, w.abs() * a_error
                x_error, a_error = u * x.abs(), a_error + u * (a.abs() + a_error)
            gram_in[e] += x.T @ x
            gram_mid[e] += a.T @ a
            rows["in"][e].append((x, x_error))
            rows["mid"][e].append((a, a_error))

    def bound(parts, size):  # one bound over all rows: it covers each batch's Gram and their sum
        if not parts:
            return torch.zeros(size, size, dtype=torch.float64)
        return gram_bound(torch.cat([r for r, _ in parts]), torch.float32, torch.cat([e for _, e in parts]))

    bounds = {"in": torch.stack([bound(parts, HIDDEN) for parts in rows["in"]]),
              "mid": torch.stack([bound(parts, INTERMEDIATE) for parts in rows["mid"]]),
              "layer": bound(rows["layer"], HIDDEN)}
    return gram_in, gram_mid, gram_layer, bounds


def _batches():
    g = torch.Generator().manual_seed(5)
    batches = []
    for length, pads in ((9, 3), (12, 0), (7, 5)):  # padded positions never count
        hidden = torch.randn(2, length, HIDDEN, generator=g)
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, length - pads:] = False
        batches.append((hidden, mask))
    return batches


@pytest.mark.parametrize("routing_weighted", [True, False])
def test_grams_formed_on_demand_equal_the_accumulated_ones(routing_weighted):
    block, batches = _tiny_moe_block(), _batches()
    stats = ExpertStatistics(NUM_EXPERTS, HIDDEN, INTERMEDIATE, routing_weighted=routing_weighted)
    hook = ExpertStatisticsHook(stats, block.experts)
    with torch.no_grad():
        for hidden, mask in batches:
            hook.token_mask = mask.reshape(-1)
            block(hidden)
    hook.remove()
    gram_in, gram_mid, gram_layer, bound = _accumulated_reference(block, batches, routing_weighted)
    assert int(stats.routed_tokens.sum()) == 2 * stats.total_tokens == 2 * int(sum(m.sum() for _, m in batches))
    for e in range(NUM_EXPERTS):  # float32 activations and GEMMs summed in float64 vs exact: rounding only
        assert_within(stats.input_gram(e), gram_in[e], bound["in"][e], f"input Gram of expert {e}")
        assert_within(stats.mid_gram(e), gram_mid[e], bound["mid"][e], f"mid Gram of expert {e}")
    assert_within(stats.gram_in, gram_in, bound["in"], "gram_in")
    assert_within(stats.gram_mid_sum, gram_mid.sum(0), bound["mid"].sum(0), "gram_mid_sum")
    assert_within(stats.gram_layer, gram_layer, bound["layer"], "gram_layer")


def test_an_expert_no_token_reached_has_zero_grams():
    block = _tiny_moe_block()
    stats = ExpertStatistics(NUM_EXPERTS, HIDDEN, INTERMEDIATE)
    hook = ExpertStatisticsHook(stats, block.experts)
    hidden = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    hook.token_mask = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        block(hidden)
    hook.remove()
    unused = [e for e in range(NUM_EXPERTS) if int(stats.routed_tokens[e]) == 0]
    assert len(unused) == NUM_EXPERTS - 2
    for e in unused:
        assert not stats.input_gram(e).any() and not stats.mid_gram(e).any()


def test_input_fit_error_terms_equal_the_direct_whitened_error():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(24, HIDDEN, generator=g, dtype=torch.float64)
    x = torch.randn(80, HIDDEN, generator=g, dtype=torch.float64)
    gram = x.T @ x
    basis = dec.orthonormal_rows(torch.randn(8, HIDDEN, generator=g, dtype=torch.float64))
    fit = dec.fit_input(weight, basis, gram)
    # the normal equations of min ||(W - G A) X^T||: G (A C A^T) = W C A^T, up to the Cholesky solve's
    # backward error 2 gamma_r (||L|| ||G|| + ||R||) (no condition number: a residual) and the rounding of the
    # products here and in the fit (inner dimensions r + 2H: gamma over |G| |A| |C| |A|^T + |W| |C| |A|^T)
    rank, f64 = basis.shape[0], torch.float64

    def norm(m):
        return float(torch.linalg.matrix_norm(m, 2))

    products = 2 * gamma(rank + 2 * HIDDEN, f64) * (
        fit.factor.abs() @ basis.abs() @ gram.abs() @ basis.abs().T + weight.abs() @ gram.abs() @ basis.abs().T)
    residual = 2 * gamma(rank, f64) * (norm(fit.lhs) * norm(fit.factor) + norm(fit.rhs))
    assert_within(fit.factor @ basis @ gram @ basis.T, weight @ gram @ basis.T, products + residual, "normal eqs")
    other = fit.factor + 0.1 * torch.randn(fit.factor.shape, generator=g, dtype=torch.float64)
    for rows in (slice(0, 12), slice(12, None), slice(None)):
        approx = other[rows] @ basis
        expected = dec.whitened_error(weight[rows], approx, gram)
        got = fit.error(other[rows], rows)
        # tr(W C W^T) - 2 tr(g A C W^T) + tr(g A C A^T g^T) vs tr(D C D^T): every term is at most
        # M = (|W| + |g A|) |C| (|W| + |g A|)^T summed, each sum has at most rows x H^2 terms
        both = weight[rows].abs() + approx.abs()
        magnitude = float(torch.einsum("ij,jk,ik->", both, gram.abs(), both))
        bound = 5 * gamma(weight[rows].numel() * HIDDEN, f64) * magnitude
        assert got == pytest.approx(expected, rel=0, abs=bound)
