"""ExactSum (offline/exact_sum.py): the same float64 sum in every order of the terms, and the exact sum."""

from __future__ import annotations

import math

import torch

from offline.exact_sum import ExactSum


def _terms(count: int = 64, size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """float32 terms like Gram partials of batches of different sizes: magnitudes over 8 decades, both
    signs, so that float64 `+=` rounds at almost every addition."""
    g = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.empty(count).uniform_(-4, 4, generator=g)
    return [(torch.randn(size, generator=g) * s).float() for s in scales]


def _plain_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(terms[0], dtype=torch.float64)
    for t in terms:
        total += t.double()
    return total


def _exact(terms: list[torch.Tensor]) -> torch.Tensor:
    total = ExactSum(terms[0].shape)
    for t in terms:
        total.add(t)
    return total.value()


def test_every_order_gives_the_same_bits_where_plain_float64_does_not():
    terms = _terms()
    g = torch.Generator().manual_seed(1)
    orders = [torch.randperm(len(terms), generator=g).tolist() for _ in range(5)]
    exact = [_exact([terms[i] for i in order]) for order in orders]
    plain = [_plain_sum([terms[i] for i in order]) for order in orders]
    for other in exact[1:]:
        assert torch.equal(other, exact[0])
    # the property is not vacuous: the plain float64 sums of the same orders differ somewhere
    assert any(not torch.equal(p, plain[0]) for p in plain[1:])


def test_the_value_is_the_correctly_rounded_exact_sum():
    terms = _terms(count=40, size=64, seed=2)
    value = _exact(terms)
    for j in range(value.numel()):
        assert value[j].item() == math.fsum(float(t[j]) for t in terms), j  # fsum: exact, rounded once


def test_ranks_summed_in_any_split_give_the_sum_of_one_process():
    """What `Ranks.exact_sum` does with the ranks' pairs: batches r, r + N, ... on rank r."""
    terms = _terms(seed=3)
    one = _exact(terms)
    for size in (2, 3, 8):
        per_rank = []
        for r in range(size):
            total = ExactSum(terms[0].shape)
            for t in terms[r::size]:
                total.add(t)
            per_rank.append(total.pair())
        assert torch.equal(ExactSum.of_pairs(per_rank).value(), one), size


def test_a_zero_sum_is_positive_zero_and_float64_terms_are_added_exactly():
    total = ExactSum((2,))
    total.add(torch.tensor([1e300, -0.0], dtype=torch.float64)).add(torch.tensor([1.0, -0.0], dtype=torch.float64))
    total.add(torch.tensor([-1e300, 0.0], dtype=torch.float64))
    value = total.value()
    assert value[0].item() == 1.0  # a plain float64 sum gives 0.0: the 1.0 is absorbed by 1e300
    assert value[1].item() == 0.0 and math.copysign(1.0, value[1].item()) == 1.0
