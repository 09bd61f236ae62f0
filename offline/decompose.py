"""The linear algebra of MoE-SVD: whitening, truncated SVD, shared bases, factor fits and U-trimming.

Conventions: a weight W is [out, in] (nn.Linear); a Gram matrix C = X^T X is [in, in] over the rows x of
the inputs (tokens), accumulated in float64. Whitening S is the lower Cholesky factor, S S^T = C, so
||(W - W') X^T||_F = ||(W - W') S||_F (App. D.2: the activation-weighted matrix W S, Eq. 11-12).
Factorisations, solves and fits are float64; sums of weight Grams W^T W use float32 GEMMs (exact
inputs) summed in float64. Callers cast the results to the stored dtypes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moesvd_vllm.errors import MoESVDError

logger = logging.getLogger(__name__)


class WhiteningError(MoESVDError):
    """A Gram matrix is not positive definite even after repair."""


# ------------------------------------------------------------------------------------------ whitening
def _jitter_scale(gram: torch.Tensor) -> float:
    diag = torch.diagonal(gram)
    scale = float(diag.abs().mean())
    return scale if scale > 0 else 1.0


def make_positive_definite(gram: torch.Tensor, where: str, *, tolerance: float = 1e-6,
                           max_attempts: int = 6) -> torch.Tensor:
    """Algorithm 5 (MakePositiveDefinite): symmetrise, lift the spectrum above `tolerance` (relative to
    the mean diagonal), retry with 10x the jitter up to `max_attempts` times; logged with `where`."""
    if not torch.isfinite(gram).all():
        raise WhiteningError(
            f"{where}: the Gram matrix has NaN/inf entries and cannot be made positive definite; the model "
            "produced non-finite activations on the calibration data (check the checkpoint and dtype)")
    if not gram.abs().sum() > 0:
        raise WhiteningError(f"{where}: the Gram matrix is all zeros (no calibration tokens reached it); "
                             "use more or different calibration data")
    sym = (gram + gram.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    scale = _jitter_scale(sym)
    jitter = tolerance * scale
    for attempt in range(max_attempts):
        lifted = torch.clamp(eigenvalues, min=0.0) + jitter
        repaired = (eigenvectors * lifted) @ eigenvectors.T
        repaired = (repaired + repaired.T) / 2
        _, info = torch.linalg.cholesky_ex(repaired)
        if int(info) == 0:
            logger.warning("%s: Gram matrix not positive definite (min eigenvalue %.3e); repaired with "
                           "eigenvalue clamp + jitter %.3e (attempt %d)", where,
                           float(eigenvalues.min()), jitter, attempt + 1)
            return repaired
        jitter *= 10
    raise WhiteningError(f"{where}: Gram matrix could not be made positive definite after {max_attempts} "
                         "attempts; use more calibration samples")


def whitening_factor(gram: torch.Tensor, where: str, *, tolerance: float = 1e-6) -> torch.Tensor:
    """Lower-triangular S with S S^T = gram (repaired with Algorithm 5 when Cholesky fails)."""
    gram = gram.double()
    factor, info = torch.linalg.cholesky_ex((gram + gram.T) / 2)
    if int(info) == 0 and torch.isfinite(factor).all():
        return factor
    return torch.linalg.cholesky(make_positive_definite(gram, where, tolerance=tolerance))


def regularized_gram(gram: torch.Tensor, prior: torch.Tensor | None, prior_weight: float,
                     damp: float, *, in_place: bool = False) -> torch.Tensor:
    """C + prior_weight * prior + damp * mean(diag) * I: keeps rarely routed experts well-posed.
    `in_place`: reuse a float64 `gram` the caller does not keep (no [H, H] copy)."""
    out = gram if in_place and gram.dtype == torch.float64 else gram.double().clone()
    if prior is not None and prior_weight > 0:
        out.add_(prior.double(), alpha=prior_weight)
    if damp > 0:
        out.diagonal().add_(damp * _jitter_scale(out))
    return out


# ------------------------------------------------------------------------------------------ SVD
@dataclass
class LowRank:
    """W ~= b @ a, b [out, r], a [r, in] (the schema's lora_b / lora_a)."""

    b: torch.Tensor
    a: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.b @ self.a


def truncated_svd(weight: torch.Tensor, rank: int, whitening: torch.Tensor | None = None) -> LowRank:
    """Rank-`rank` approximation of `weight`; with `whitening` S, the activation-weighted SVD
    (Eq. 11-12): W S = U Sigma V^T, W ~= U_r Sigma_r V_r^T S^{-1}. Sigma is split evenly between the
    factors (sqrt on each side)."""
    w = weight.double()
    target = w if whitening is None else w @ whitening
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    rank = min(rank, sigma.numel())
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if whitening is not None:
        # a S^{-1}: solve a' S = a, i.e. S^T a'^T = a^T with S lower triangular
        a = torch.linalg.solve_triangular(whitening.T, a.T, upper=True).T
    return LowRank(b=b, a=a)


def principal_rank(weight: torch.Tensor, threshold: float) -> int:
    """r_i of Eq. 4: singular values above `threshold` times the largest (Algorithm 1).
    Computed as the eigenvalues of the smaller Gram W W^T or W^T W (sigma^2): several times cheaper
    than an SVD on large experts and exact for thresholds well above float32 precision."""
    w = weight.float()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eigenvalues = torch.linalg.eigvalsh(gram.double()).clamp(min=0.0)
    return int((eigenvalues > (threshold ** 2) * eigenvalues.max()).sum())


# ------------------------------------------------------------------------------------------ shared bases
def _top_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Columns: eigenvectors of the symmetric `matrix` for its `rank` largest eigenvalues."""
    _, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors[:, -rank:].flip(-1)


def orthonormal_rows(basis: torch.Tensor) -> torch.Tensor:
    """Same row space, orthonormal rows (better conditioned factors; the least-squares fit is unchanged)."""
    q, _ = torch.linalg.qr(basis.T)
    return q.T


def weighted_weight_gram(weights: Iterable[torch.Tensor], coefficients: Iterable[float]) -> torch.Tensor:
    """sum_e c_e W_e^T W_e [H, H] float64: one float32 GEMM per weight (bf16/float32 weights are exact in
    float32), summed in float64."""
    moment = None
    for weight, coefficient in zip(weights, coefficients):
        w = weight.float()
        term = (w.T @ w).double()
        moment = coefficient * term if moment is None else moment.add_(term, alpha=coefficient)
    if moment is None:
        raise ValueError("no weights")
    return moment


def stacked_input_basis(in_weights: Iterable[torch.Tensor], token_counts: torch.Tensor,
                        layer_gram: torch.Tensor, rank: int, where: str) -> torch.Tensor:
    """A [r, H]: the top-r right singular subspace of all experts' gate and up rows, stacked, whitened
    by the layer's input Gram and weighted by sqrt(f_e) (V-sharing, Eq. 5-6, with a shared subspace
    in place of the most frequent expert's). `in_weights[e]` is [gate_e; up_e] ([2I, H])."""
    whitening = whitening_factor(layer_gram / max(float(token_counts.sum()), 1.0), f"{where} layer input")
    total = float(token_counts.sum()) or 1.0
    # sum_e f_e (W_e S)^T (W_e S) = S^T (sum_e f_e W_e^T W_e) S: one [H, H] sum, whitened once
    weighted = weighted_weight_gram(in_weights, [count / total for count in token_counts.tolist()])
    moment = whitening.T @ weighted @ whitening
    top = _top_eigenvectors(moment, rank)  # V_r in whitened coordinates [H, r]
    basis = torch.linalg.solve_triangular(whitening.T, top, upper=True).T  # V_r^T S^{-1}
    return orthonormal_rows(basis)


def stacked_output_basis(down_weights: Iterable[torch.Tensor], mid_grams: Iterable[torch.Tensor],
                         rank: int) -> torch.Tensor:
    """B [H, r]: top-r left singular subspace of [W_down_e S_e]_e; with the unnormalised per-expert Grams
    (S_e S_e^T = Y_e^T Y_e) this minimises sum_e ||(I - B B^T) W_down_e Y_e^T||^2 exactly, tokens of
    frequent experts counting as often as they occur. Both arguments may be generators (one expert's
    Gram alive at a time)."""
    moment = None
    for weight, gram in zip(down_weights, mid_grams):
        w = weight.double()
        term = w @ gram.double() @ w.T
        moment = term if moment is None else moment.add_(term)
    return _top_eigenvectors(moment, rank)


def block_output_basis(output_gram: torch.Tensor, rank: int) -> torch.Tensor:
    """B [H, r]: top-r principal subspace of the routed MoE output y = sum_e w_e W_down_e h_e.
    With D_e = B^T W_down_e the compressed block outputs B B^T y (when gate/up are exact), so this B
    minimises the block's output error ||(I - B B^T) Y||^2 exactly, routing weights and the cancellation
    between the selected experts included (the per-expert objective of `stacked_output_basis` ignores
    both)."""
    return _top_eigenvectors(output_gram.double(), rank)


def most_frequent_expert_bases(in_weight: torch.Tensor, down_weight: torch.Tensor, in_gram: torch.Tensor,
                               mid_gram: torch.Tensor, rank: int, where: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's V-sharing (Eq. 5): bases from the most frequently routed expert's own whitened SVDs.
    A spans the right singular vectors of its [gate; up] S_x, B the left singular vectors of
    down S_y (our schema shares the output side of down)."""
    lr_in = truncated_svd(in_weight, rank, whitening_factor(in_gram, f"{where} top expert input"))
    lr_out = truncated_svd(down_weight, rank, whitening_factor(mid_gram, f"{where} top expert down input"))
    basis_in = orthonormal_rows(lr_in.a)
    basis_out, _ = torch.linalg.qr(lr_out.b)
    return basis_in, basis_out


@dataclass
class InputFit:
    """The whitened least-squares fit of one expert's input-side weight W [out, H] on a shared basis A
    [r, H] with the expert's Gram C: G = W C A^T (A C A^T)^{-1}. It keeps the terms that give the
    whitened error of any factor g against W without forming g A (U-trimming and the error report):
    ||(W - g A) X^T||_F^2 = tr(W C W^T) - 2 tr(g A C W^T) + tr(g (A C A^T) g^T)."""

    factor: torch.Tensor  # G [out, r] float64
    lhs: torch.Tensor  # A C A^T [r, r]
    rhs: torch.Tensor  # A C W^T [r, out]
    row_energy: torch.Tensor  # [out] diag(W C W^T)

    def error(self, factor: torch.Tensor, rows: slice = slice(None)) -> tuple[float, float]:
        """(||(W_rows - g A) X^T||^2, ||W_rows X^T||^2) for g = `factor` [len(rows), r]."""
        g = factor.double()
        energy = float(self.row_energy[rows].sum())
        cross = float((g * self.rhs[:, rows].T).sum())
        fitted = float(((g @ self.lhs) * g).sum())
        return energy - 2.0 * cross + fitted, energy


def fit_input(weight: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> InputFit:
    """G [out, r] minimising ||(W - G A) S||_F^2 with S S^T = gram: G = W C A^T (A C A^T)^{-1}.
    A C and C W^T are formed once (gate and up are one [2I, H] weight: one solve with 2I right-hand
    sides); A C A^T is symmetric positive definite for a positive definite C, so Cholesky solves it."""
    w, a, c = weight.double(), basis.double(), gram.double()
    cw = c @ w.T  # [H, out]
    rhs = a @ cw
    lhs = (a @ c) @ a.T
    lhs = (lhs + lhs.T) / 2
    factor_l, info = torch.linalg.cholesky_ex(lhs)
    solved = torch.cholesky_solve(rhs, factor_l) if int(info) == 0 else torch.linalg.solve(lhs, rhs)
    return InputFit(factor=solved.T, lhs=lhs, rhs=rhs, row_energy=(w * cw.T).sum(dim=1))


def identity_fit(weight: torch.Tensor, gram: torch.Tensor) -> InputFit:
    """`fit_input` with A = I (a layer without bases): G = W exactly, so no H x H products or solve."""
    w, c = weight.double(), gram.double()
    cw = c @ w.T
    return InputFit(factor=w, lhs=c, rhs=cw, row_energy=(w * cw.T).sum(dim=1))


def fit_input_factor(weight: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """G [out, r] minimising ||(W - G A) S||_F^2 with S S^T = gram: G = W C A^T (A C A^T)^{-1}."""
    return fit_input(weight, basis, gram).factor


def fit_output_factor(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """D [r, in] = B^T W: for orthonormal B the optimum of ||(W - B D) S||_F for any whitening S."""
    return basis.double().T @ weight.double()


def fit_output_factor_to_outputs(weight: torch.Tensor, basis: torch.Tensor | None, cross_gram: torch.Tensor,
                                 gram: torch.Tensor) -> torch.Tensor:
    """D [r, I] minimising sum_t ||B D h'_t - W h_t||^2: the dense down projection W [H, I] applied to the
    dense intermediate activations h, reproduced from the compressed ones h' (those of the fitted gate and
    up). Normal equations: B^T B D C' = B^T W C_x, so for orthonormal B [H, r]
        D = B^T W C_x C'^{-1},   C_x = sum h h'^T (`cross_gram`), C' = sum h' h'^T (`gram`, positive definite);
    `basis` None (no output basis): the full [H, I] correction W C_x C'^{-1}. With h' = h this is
    `fit_output_factor`; it is the down half of a sequential (GPTQ-style) fit: the error the compressed
    gate and up leave in h is compensated where it is cheapest, in the factor that reads h."""
    w, c = weight.double(), gram.double()
    target = w @ cross_gram.double()  # [H, I]
    c = (c + c.T) / 2
    factor_l, info = torch.linalg.cholesky_ex(c)
    solved = (torch.cholesky_solve(target.T, factor_l) if int(info) == 0 else torch.linalg.solve(c, target.T)).T
    return solved if basis is None else basis.double().T @ solved


# ------------------------------------------------------------------------------------------ errors
def whitened_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """(||(W - W') X^T||^2, ||W X^T||^2) via the Gram: tr(D C D^T)."""
    w, d, c = weight.double(), weight.double() - approx.double(), gram.double()
    return float(torch.einsum("ij,jk,ik->", d, c, d)), float(torch.einsum("ij,jk,ik->", w, c, w))


# ------------------------------------------------------------------------------------------ trimming
def trimming_groups(num_experts: int, group_size: int) -> list[list[int]]:
    """U-trimming's groups: `group_size` consecutive experts each (the last may be smaller)."""
    return [list(range(s, min(s + group_size, num_experts))) for s in range(0, num_experts, group_size)]


def kept_in_group(frequency: torch.Tensor, group: list[int], keep_per_group: int) -> list[int]:
    """The `keep_per_group` most frequently routed experts of `group` (ties: lower index), ascending."""
    order = sorted(group, key=lambda e: (-float(frequency[e]), e))
    return sorted(order[:keep_per_group])


def trimming_bank_map(frequency: torch.Tensor, keep_per_group: int, group_size: int,
                      distance: torch.Tensor) -> tuple[list[int], list[int]]:
    """U-trimming (Eq. 7-8, App. D.4): in each group of `group_size` consecutive experts keep the
    `keep_per_group` most frequently routed ones; every other expert is served by the kept expert of its
    group at the smallest `distance[e, k]`. Returns (bank_map, kept experts in bank order)."""
    groups = trimming_groups(frequency.numel(), group_size)
    kept = sorted(e for group in groups for e in kept_in_group(frequency, group, keep_per_group))
    bank_of_kept = {e: k for k, e in enumerate(kept)}
    bank_map = []
    for group in groups:
        group_kept = [e for e in group if e in bank_of_kept]
        for e in group:
            nearest = e if e in bank_of_kept else min(group_kept, key=lambda k: (float(distance[e, k]), k))
            bank_map.append(bank_of_kept[nearest])
    return bank_map, kept
