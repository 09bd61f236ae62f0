"""Scores of the results protocol (offline/results_protocol.py): per-window NLL, KL and top-1 agreement
against the dense model, and paired bootstrap intervals over evaluation windows.

Every number is kept per window, so that intervals can be recomputed from the committed JSON: a window is
`seq_len` consecutive tokens of one evaluation text (documents joined by the end-of-text token), every
token after its first scored. KL is KL(dense || compressed) of the next-token distributions, averaged over
the window's scored tokens; top-1 agreement is the share of those tokens where both argmaxes agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowScores:
    nll: list[float]  # summed NLL (nats) of each window's scored tokens
    kl: list[float]  # mean KL(dense || model) per scored token, per window (0 for the dense model)
    top1: list[float]  # share of scored tokens whose argmax equals the dense model's, per window
    tokens_per_window: int

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / (len(self.nll) * self.tokens_per_window))

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "kl": sum(self.kl) / len(self.kl), "top1": sum(self.top1) / len(self.top1),
                "nll": _rounded(self.nll), "kl_windows": _rounded(self.kl), "top1_windows": _rounded(self.top1),
                "tokens_per_window": self.tokens_per_window}


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.7g}") for v in values]  # the JSON keeps 7 significant digits (float32 noise)


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[n, L-1, V] float32 log-probabilities of each window's tokens 2..L (log-softmax in float64)."""
    model.eval()
    return torch.cat([model(input_ids=windows[i:i + batch_size]).logits[:, :-1].double().log_softmax(-1).float()
                      for i in range(0, windows.shape[0], batch_size)])


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: torch.Tensor, dense: torch.Tensor | None,
                  batch_size: int = 8) -> WindowScores:
    """Scores of `model` on `windows`; `dense` are the dense model's `next_token_logprobs` (None: the dense
    model itself, KL 0 and agreement 1)."""
    logprobs = next_token_logprobs(model, windows, batch_size)
    targets = windows[:, 1:]
    nll = -logprobs.double().gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)
    if dense is None:
        kl = torch.zeros(windows.shape[0])
        top1 = torch.ones(windows.shape[0])
    else:
        kl = (dense.double().exp() * (dense.double() - logprobs.double())).sum(-1).mean(-1)
        top1 = (dense.argmax(-1) == logprobs.argmax(-1)).double().mean(-1)
    return WindowScores(nll.tolist(), kl.tolist(), top1.tolist(), targets.shape[1])


def bootstrap_ppl_ratio(nll_a: list[float], nll_b: list[float], tokens_per_window: int,
                        resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """ppl(a) / ppl(b) on the same windows, with a paired bootstrap 95 % interval over windows.

    ppl ratio = exp(mean over scored tokens of nll_a - nll_b); resampling whole windows keeps the
    dependence between neighbouring tokens inside a window (a block bootstrap)."""
    if len(nll_a) != len(nll_b):
        raise ValueError(f"paired bootstrap needs the same windows: {len(nll_a)} vs {len(nll_b)}")
    diff = torch.tensor(nll_a, dtype=torch.float64) - torch.tensor(nll_b, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, diff.numel(), (resamples, diff.numel()), generator=generator)
    means = diff[picks].mean(-1) / tokens_per_window
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(diff.mean().item() / tokens_per_window), math.exp(low), math.exp(high)
