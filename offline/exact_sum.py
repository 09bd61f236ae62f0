"""Sums whose value does not depend on the order of their terms, so that 1 and N processes agree bit for bit.

One process adds the calibration batches' statistics (layer-wide Grams, activation sums) in batch order;
N processes (offline/distributed.py) add batches r, r + N, ... on rank r and then the ranks' sums. A float64
`+=` rounds after every addition, so the two orders differ by ~1e-16 relative. That is harmless for a
solve but not for an eigendecomposition with a dense spectrum: eigenvectors of nearly equal eigenvalues
rotate, and the shared bases cut from them, stored in bf16, round to other values (up to 1.5e-3 relative
on a Qwen3-30B-A3B-shaped random layer, docs/performance.md).

`ExactSum` keeps a sum as the unevaluated pair hi + lo of float64 tensors. Every addition goes through
Knuth's TwoSum, which returns the rounded sum and its rounding error exactly (Knuth, TAOCP vol. 2,
4.2.2, Theorem B; no FMA or reassociation is involved, so CPU and CUDA give the same bits); the errors
are added into lo. All terms (float32 GEMM partials or float64 sums of them) and all errors are multiples
of the smallest term's unit in the last place, and lo stays below n ulp(hi) / 2, so lo's own additions
are exact as long as no term is more than about 2^(53 - log2 n) times smaller than the total, which a Gram
of real activations never has. Then hi + lo is the exact sum, the same real number in every order, and
`value()` rounds it once: the same float64 in every order.
"""
from __future__ import annotations

import torch


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (elementwise, float64)."""
    s = a + b
    b_part = s - a
    a_part = s - b_part
    return s, (a - a_part) + (b - b_part)


class ExactSum:
    """A float64 sum of tensors, exact until `value()` rounds it once (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None):
        self.hi = torch.zeros(shape, dtype=torch.float64, device=device)
        self.lo = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, term: torch.Tensor) -> "ExactSum":
        term = term.to(device=self.hi.device, dtype=torch.float64)
        self.hi, error = two_sum(self.hi, term)
        self.lo += error
        return self

    def add_sum(self, other: "ExactSum") -> "ExactSum":
        """Add another exact sum (its hi and lo are both exact terms)."""
        return self.add(other.hi).add(other.lo)

    def value(self) -> torch.Tensor:
        """The exact sum rounded to float64 once; + 0.0 turns a -0.0 into 0.0 (the sign of a zero sum
        would otherwise depend on the order)."""
        return (self.hi + self.lo) + 0.0

    def pair(self) -> torch.Tensor:
        """[2, *shape]: hi and lo stacked, for collectives."""
        return torch.stack([self.hi, self.lo])

    @classmethod
    def of_pairs(cls, pairs: list[torch.Tensor]) -> "ExactSum":
        """The exact sum of several `pair()`s (for example one per rank)."""
        total = cls(pairs[0].shape[1:], pairs[0].device)
        for pair in pairs:
            total.add(pair[0]).add(pair[1])
        return total
