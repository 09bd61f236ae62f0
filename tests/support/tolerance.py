"""Numerical tolerances derived from the number format, the operands' magnitudes and the accumulation length.

No tolerance in the suite is a constant tuned on one CPU. The CPUs we must pass on (Intel AMX, AMD
AVX-512-BF16, AVX2-only) run the same float32/float64 arithmetic but sum in different orders: MKL picks a
GEMM kernel per CPU (blocking, SIMD width, FMA use), threads split the sums differently. So a tolerance
must bound the error for *every* order, not the error one CPU happened to show.

1. Products (GEMMs, Grams, a rounding to a storage dtype): the standard forward error bound (Higham,
   *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Sec. 3.1, Eqs. 3.4-3.5). A dot product of
   length n computed in a format with unit roundoff u = eps / 2 satisfies, in ANY order of summation,
   with or without FMA,

       |fl(x . y) - x . y|  <=  gamma_n |x| . |y|,        gamma_n = n u / (1 - n u),

   hence |fl(A B) - A B| <= gamma_n |A| |B| elementwise for a product with inner dimension n, and
   |fl(x) - x| <= u |x| for a rounding. These are worst-case bounds: no probability, no safety factor.
   The typical error is ~sqrt(n) u |x|.|y| (Higham & Mary 2019) and varies between CPUs; the bound does
   not. It stays far below a wiring error (a wrong index, a dropped scale or token: a relative change of
   1e-2 or more) while n u << 1e-2; `assert_within` checks that the bound is that small before using it.

2. Whole forward passes (the logits of a transformer): attention, norms and softmax mix the errors, so no
   useful closed-form bound exists. There the suite compares against a float64 computation of the same
   model (float64 rounding is ~1e-14 of the logits here, on every CPU):
   - models evaluated in float64 that differ only by float32 *storage* rounding of their weights (the
     full-rank conversions of offline.full_rank): `forward_tolerance`, gamma over the terms each logit
     accumulates per layer times the logits' magnitude;
   - float32 evaluations (vLLM servers, the plugin): the float32 rounding noise of the same network,
     measured on the spot against its float64 evaluation (`float32_logprob_noise`), times `SAFETY`
     (`served_logprob_tolerance`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

# Two float32 evaluations of one function (e.g. vLLM's kernels vs transformers', or the plugin's factored
# experts vs stock fused experts) each differ from the exact value by their rounding noise; their
# difference is at most the sum of the two (2x). The worst-case bound above does not depend on the order
# of summation, but the typical error does (sequential vs blocked/pairwise sums: up to ~sqrt(block)):
# we allow the other implementation to be 4x noisier than transformers' float32 forward. 2 x 4 = 8.
SAFETY = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to `dtype` (round to nearest)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u) (Higham Eq. 3.8): relative bound on n accumulated roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} is undefined in {dtype}: n u = {nu:.3g} >= 1")
    return nu / (1 - nu)


def matmul_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - a @ b| for exact operands, the product computed in `dtype`:
    gamma_n |a| |b| with n = the inner dimension."""
    return gamma(a.shape[-1], dtype) * (a.detach().abs().double() @ b.detach().abs().double())


def gram_bound(rows: torch.Tensor, dtype: torch.dtype, row_error: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise bound on |fl(R^T R) - X^T X| [H, H] for exact rows X = `rows` [T, H] and computed rows R
    with |R - X| <= `row_error` elementwise (None: R = X), the product formed in `dtype` and the partial
    Grams summed in float64 (as offline.calibration.gram does).

    R^T R - X^T X = X^T D + D^T X + D^T D (D = R - X), so with E = row_error and M = |X| + E:
    |fl(R^T R) - X^T X| <= |X|^T E + E^T |X| + E^T E + (gamma_T + gamma_T(float64)) M^T M.
    """
    x = rows.abs().double()
    e = torch.zeros_like(x) if row_error is None else row_error.double()
    m = x + e
    n = max(rows.shape[0], 1)
    return x.T @ e + e.T @ x + e.T @ e + (gamma(n, dtype) + gamma(n, torch.float64)) * (m.T @ m)


def rounding_bound(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |fl(values) - values| when `values` are rounded to `dtype`: u |values|."""
    return unit_roundoff(dtype) * values.abs().double()


# silu in float32: max |silu'(x)| = 1.0998 (at x = 2.4); exp within 1 ulp (2 u), an add and a divide: <= 5 u
# relative (measured 2.6 u on 1e6 points).
SILU_LIPSCHITZ = 1.1
SILU_ROUNDINGS = 5


def swiglu_bound(x: torch.Tensor, gate_up: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound on |silu(x W_g^T) * (x W_u^T) computed in `dtype` - exact| for exact rows `x` [T, H]
    and one expert's fused W = `gate_up` [2I, H] (offline.calibration.expert_activations): gate and up
    (inner dimension H) are within gamma_H |x| |W|^T; silu scales the gate's error by at most SILU_LIPSCHITZ
    and rounds (SILU_ROUNDINGS u); the product rounds once more (u)."""
    x, gate_up = x.detach(), gate_up.detach()
    gate, up = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
    gate_error, up_error = matmul_bound(x, gate_up.T, dtype).chunk(2, dim=-1)
    u = unit_roundoff(dtype)
    act = torch.nn.functional.silu(gate).abs()
    act_error = SILU_LIPSCHITZ * gate_error + SILU_ROUNDINGS * u * (act + SILU_LIPSCHITZ * gate_error)
    return (act + act_error) * (up.abs() + up_error) * (1 + u) - act * up.abs()


def solve_bound(solution_norm: float, condition: float, n: int, dtype: torch.dtype = torch.float64) -> float:
    """Normwise bound on the error of a solution (or a reconstruction) computed through backward-stable
    factorisations of an n x n problem with condition number `condition` (Cholesky, triangular solves, QR,
    SVD, eigh: Higham Thms. 8.5, 10.3, 19.4): forming the problem and factoring it each perturb it by at
    most gamma_n relative, which the condition number amplifies (Higham Thm. 7.2): 2 gamma_n cond ||x||."""
    return 2 * gamma(n, dtype) * condition * solution_norm


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str = "",
                  *, max_relative_bound: float = 1e-3) -> None:
    """|actual - expected| <= bound elementwise, and the bound itself is at most `max_relative_bound` of
    max |expected| (so the check can still fail on a wiring error: a relative change of 1e-2 or more)."""
    difference = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    largest = float(bound.max()) if bound.numel() else 0.0
    assert largest <= max_relative_bound * scale, (
        f"{what}: the tolerance {largest:.3g} is not small against the values (max {scale:.3g}): "
        "it could not detect a wiring error")
    excess = difference - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert not bool((excess > 0).any()), (
        f"{what}: |difference| {float(difference.flatten()[worst]):.3g} exceeds its rounding bound "
        f"{float(bound.expand_as(difference).flatten()[worst]):.3g} at flat index {worst} "
        f"(max |difference| {float(difference.max()):.3g})")


def forward_tolerance(logits: torch.Tensor, terms: int, dtype: torch.dtype) -> float:
    """Bound on max |logit difference| between two float64 forwards of one function whose weights differ by
    `dtype` rounding, or that sum in different orders in `dtype` itself.

    Stored factors G = fl(W P^T) and A = fl(P) multiply back to W within (2 u + gamma_H) |W P^T| |P|: each
    decomposed layer perturbs its products over the hidden dimension by O(H u) relative. Each logit thus
    accumulates `terms` (num_layers x hidden) rounded terms, each within u of its part: gamma_terms times the
    logits' magnitude. This assumes the network does not amplify a relative perturbation of its weights
    (relative condition <= 1: RMSNorm rescales, softmax is 1-Lipschitz in the max norm). The tiny fixtures
    (4 layers x hidden 128 = 512 terms) measure 5-7 u x max |logit| for float32 storage, 70-100x inside.
    """
    return gamma(terms, dtype) * max(1.0, float(logits.abs().max()))


@functools.lru_cache(maxsize=None)
def _reference_logprob_noise(model_dir: str, sequences: tuple[tuple[int, ...], ...]) -> tuple[float, float]:
    from offline.reference import load_reference_model

    logprobs = []
    for dtype in (torch.float32, torch.float64):
        model = load_reference_model(model_dir, dtype=dtype)
        with torch.no_grad():
            logprobs.append(torch.cat([
                model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
                .gather(1, torch.tensor(ids[1:])[:, None])[:, 0] for ids in sequences]))
        del model
    return float((logprobs[0] - logprobs[1]).abs().max()), float(logprobs[1].abs().max())


def float32_logprob_noise(model_dir: str | os.PathLike, sequences) -> tuple[float, float]:
    """(noise, magnitude): max |float32 - float64| and max |logprob| over the log-probabilities of each next
    token of the token-id `sequences` (what the served comparisons read) under the PyTorch reference of
    `model_dir` (offline.reference, dense or compressed). The noise is this network's float32 rounding error
    on this CPU, measured against its float64 evaluation. Cached per model and sequences."""
    return _reference_logprob_noise(str(model_dir), tuple(tuple(int(t) for t in ids) for ids in sequences))


def served_logprob_tolerance(model_dir: str | os.PathLike, sequences) -> float:
    """Tolerance on |logprob difference| between two float32 evaluations of the model in `model_dir` (a vLLM
    server, the plugin, transformers): SAFETY x its measured float32 noise (`float32_logprob_noise` on
    `sequences`: use the compared prompts and continuations) plus both sides' float32 rounding of the
    largest |logprob|. Also bounds means of such differences (delta NLL, log perplexity ratio) and the
    top-k KL (sum_i p_i |d log p_i| <= max |d log p|)."""
    noise, magnitude = float32_logprob_noise(model_dir, sequences)
    return SAFETY * noise + 2 * unit_roundoff(torch.float32) * magnitude


def sample_std_tolerance(count: int, dtype: torch.dtype, sigmas: float = 6.0) -> float:
    """Relative tolerance on the sample standard deviation of `count` i.i.d. normal values stored in `dtype`:
    `sigmas` standard errors (the sample std's relative standard error is 1 / sqrt(2 (n - 1))) plus one
    rounding (a rounding to `dtype` changes each value, hence the std, by at most u relative)."""
    return sigmas / math.sqrt(2 * (count - 1)) + unit_roundoff(dtype)
