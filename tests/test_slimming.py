"""Intermediate-neuron selection with least-squares compensation (offline/slimming.py)."""

import pytest
import torch

from offline.slimming import compensated_down, greedy_neuron_selection, slim_expert, slim_experts_in_place
from tests.support.tolerance import assert_within, rounding_bound, solve_bound


def _norm(m):
    return float(torch.linalg.matrix_norm(m.double(), 2))


def _error(down, activations, kept, new_down):
    """||W Y^T - W' Y_S^T||^2 on the sample itself."""
    return float(((activations @ down.T) - (activations[:, kept] @ new_down.T)).pow(2).sum())


def _sample(tokens=400, neurons=12, hidden=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(tokens, neurons, generator=g, dtype=torch.float64)
    down = torch.randn(hidden, neurons, generator=g, dtype=torch.float64)
    return activations, down


def test_compensated_down_is_the_least_squares_fit():
    activations, down = _sample()
    kept = torch.tensor([0, 2, 3, 7, 9])
    fitted = compensated_down(down, activations.T @ activations, kept)
    reference = torch.linalg.lstsq(activations[:, kept], activations @ down.T).solution.T
    # normal equations (condition of C_SS = Y_S^T Y_S) vs QR least squares (up to the same): both solves
    condition = float(torch.linalg.cond(activations[:, kept].T @ activations[:, kept]))
    assert_within(fitted, reference, 2 * solve_bound(_norm(reference), condition, kept.numel()), "lstsq")
    assert _error(down, activations, kept, fitted) < _error(down, activations, kept, down[:, kept])


def test_redundant_neurons_are_removed_first_at_no_cost():
    activations, down = _sample(neurons=8)
    # neurons 5, 6, 7 are linear combinations of 0..4: dropping them loses nothing after compensation
    mix = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    activations[:, 5:] = activations[:, :5] @ mix
    damping = 1e-9
    gram = activations.T @ activations + damping * torch.eye(8, dtype=torch.float64)
    slim = slim_expert(down, gram, keep=5)
    assert len(slim.kept) == 5
    # the kept neurons span all 8: an exact compensation W* exists (residual 0). The damped fit minimises
    # ||r||^2 + damping ||W - W' P_S||^2, at most its value at W*; the float64 solve adds its rounding.
    kept_activations = activations[:, slim.kept]
    exact = torch.linalg.lstsq(kept_activations, activations @ down.T).solution.T
    unkept = down.clone()
    unkept[:, slim.kept] -= exact
    condition = float(torch.linalg.cond(gram[slim.kept][:, slim.kept]))
    residual = (damping ** 0.5 * float(unkept.norm())
                + _norm(kept_activations) * solve_bound(float(exact.norm()), condition, len(slim.kept)))
    assert _error(down, activations, slim.kept, slim.down) <= residual ** 2
    assert residual ** 2 < 1e-9 * float((activations @ down.T).pow(2).sum())  # so dropping a needed one fails


def test_greedy_beats_keeping_the_largest_activations():
    activations, down = _sample(neurons=16, seed=3)
    activations[:, :4] *= 3.0  # large but predictable from each other: correlated copies
    activations[:, 1:4] = activations[:, :1] + 0.05 * activations[:, 1:4]
    gram = activations.T @ activations
    greedy = greedy_neuron_selection(down, gram, keep=8)
    by_magnitude = torch.topk(torch.diagonal(gram), 8).indices.sort().values
    greedy_error = _error(down, activations, greedy, compensated_down(down, gram, greedy))
    magnitude_error = _error(down, activations, by_magnitude, compensated_down(down, gram, by_magnitude))
    assert greedy_error < magnitude_error


def test_keeping_every_neuron_changes_nothing():
    activations, down = _sample()
    slim = slim_expert(down, activations.T @ activations, keep=12)
    assert slim.kept.tolist() == list(range(12))
    condition = float(torch.linalg.cond(activations.T @ activations))
    assert_within(slim.down, down, solve_bound(_norm(down), condition, 12), "all neurons kept")


@pytest.mark.parametrize("keep", [0, 13])
def test_keep_outside_the_layer_is_rejected(keep):
    activations, down = _sample()
    with pytest.raises(ValueError, match="keep must be"):
        greedy_neuron_selection(down, activations.T @ activations, keep)


def test_slimming_a_layer_in_place_zeroes_dropped_neurons_and_compensates_down():
    g = torch.Generator().manual_seed(5)
    experts, hidden, neurons, tokens = 3, 6, 8, 300
    gate = torch.randn(experts, neurons, hidden, generator=g)
    up = torch.randn(experts, neurons, hidden, generator=g)
    down = torch.randn(experts, hidden, neurons, generator=g)
    inputs = torch.randn(tokens, hidden, generator=g)
    original = down.clone()

    def mid_gram(e):
        activations = (torch.nn.functional.silu(inputs @ gate[e].T) * (inputs @ up[e].T)).double()
        return activations.T @ activations

    grams = [mid_gram(e) for e in range(experts)]
    result = slim_experts_in_place(gate, up, down, mid_gram, keep=5)
    assert 0.0 < result.error < 1.0
    for e, kept in enumerate(result.kept):
        dropped = sorted(set(range(neurons)) - set(kept.tolist()))
        assert len(kept) == 5 and not gate[e][dropped].any() and not up[e][dropped].any()
        assert not down[e][:, dropped].any()
        expected = compensated_down(original[e], grams[e], kept)
        # the same float64 solve (its rounding, twice), stored in float32 (one rounding)
        condition = float(torch.linalg.cond(grams[e][kept][:, kept]))
        bound = rounding_bound(expected, torch.float32) + 2 * solve_bound(_norm(expected), condition, len(kept))
        assert_within(down[e][:, kept].double(), expected, bound, f"compensated down of expert {e}")
