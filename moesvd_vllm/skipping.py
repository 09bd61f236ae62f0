"""Dynamic expert skipping (NAEE, Lu et al. 2024; the Qwen3-30B-A3B notebook, seed 002): the one
implementation of the rule, shared by the vLLM plugin (moesvd_vllm/layers.py) and the PyTorch reference
(offline/skipping.py, offline/reference.py). Pure torch; no vLLM import.

For each token with routing weights w_1..w_k over its k chosen experts (after the architecture's router:
softmax or sigmoid, top-k, renormalisation, routed scaling), keep the top-1 expert and every other chosen
expert j with

    w_j >= beta * max_i w_i                                            (beta in [0, 1], per MoE layer)

beta = 0 keeps everything, beta = 1 keeps only the top-1 (and experts tied with it). The ratio w_j / w_1 is
the same before and after a renormalisation, so the rule can be applied to the router's final weights.
The kept weights are then renormalised as the architecture does: a router that renormalises its top-k
(`renormalize`) gets the kept weights rescaled to the total the k weights had (1, or the routed scaling
factor), i.e. softmax probabilities renormalised over the kept experts; a router that does not
renormalise keeps the kept weights unchanged (the skipped ones contribute nothing).

Real skipped work: `kept_pairs` lists the kept (token, expert) pairs as rows of a top-1 problem
(hidden [P, H], weights [P, 1], ids [P, 1]), so a fused MoE kernel runs P <= T k pairs instead of T k;
`combine_pairs` sums each token's rows back (float32 accumulation). See docs/performance.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from moesvd_vllm.errors import MoESVDError

# Server-start override of the checkpoint's betas: a number for every MoE layer ("0.3"), "off" (no
# skipping), or a JSON object {"<layer>": beta} (layers not named keep the checkpoint's beta).
BETA_ENV = "MOESVD_SKIP_BETA"


class SkippingError(MoESVDError):
    """A bad beta (checkpoint metadata, compressor option or the MOESVD_SKIP_BETA override)."""


def check_beta(beta, where: str, fix: str) -> float:
    """`beta` as a float in [0, 1], or a SkippingError naming `where` and `fix`."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise SkippingError(f"{where}: beta must be a number in [0, 1], got {beta!r}; {fix}")
    if not 0.0 <= beta <= 1.0:
        raise SkippingError(
            f"{where}: beta {beta} is outside [0, 1] (0 keeps every chosen expert, 1 keeps only the top-1; "
            f"a negative beta or one above 1 has no meaning); {fix}")
    return float(beta)


def keep_mask(topk_weights: torch.Tensor, beta: float) -> torch.Tensor:
    """[T, k] bool: True for the pairs the rule keeps (always the top-1 of each token)."""
    top1 = topk_weights.amax(dim=-1, keepdim=True)
    return topk_weights >= beta * top1


def kept_weights(topk_weights: torch.Tensor, keep: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The routing weights after skipping: skipped pairs 0, kept ones renormalised if the router does."""
    kept = torch.where(keep, topk_weights, torch.zeros_like(topk_weights))
    if renormalize:  # back to the total the router gave the k weights (1, or the routed scaling factor)
        total = kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
        kept = kept * (topk_weights.sum(-1, keepdim=True) / total)
    return kept


@dataclass
class KeptPairs:
    """The kept (token, expert) pairs as a top-1 routing problem for a fused MoE kernel."""

    hidden: torch.Tensor  # [P, H] the token's hidden state, once per kept pair
    weights: torch.Tensor  # [P, 1]
    ids: torch.Tensor  # [P, 1] expert ids
    tokens: torch.Tensor  # [P] the token each row belongs to
    num_tokens: int


def kept_pairs(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> KeptPairs:
    token, slot = keep.nonzero(as_tuple=True)
    return KeptPairs(hidden[token], weights[token, slot].unsqueeze(1).contiguous(),
                     ids[token, slot].unsqueeze(1).contiguous(), token, hidden.shape[0])


def combine_pairs(pair_output: torch.Tensor, pairs: KeptPairs) -> torch.Tensor:
    """[T, H]: each token's sum of its rows of `pair_output` [P, H] (weighted already), float32 sums."""
    out = pair_output.new_zeros((pairs.num_tokens, pair_output.shape[1]), dtype=torch.float32)
    out.index_add_(0, pairs.tokens, pair_output.float())
    return out.to(pair_output.dtype)


# --------------------------------------------------------------------------------------- betas
def parse_override(text: str) -> float | dict[str, float] | None:
    """MOESVD_SKIP_BETA's value: None ('off'), one beta for every layer, or {layer: beta}."""
    fix = (f"set {BETA_ENV} to a number in [0, 1], 'off', or a JSON object such as '{{\"3\": 0.2}}'")
    text = text.strip()
    if text.lower() in ("off", "none"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise SkippingError(f"{BETA_ENV}={text!r} is not a number, 'off' or a JSON object; {fix}") from None
    if isinstance(value, dict):
        return {str(int(k)) if str(k).isdigit() else str(k): check_beta(v, f"{BETA_ENV}[{k!r}]", fix)
                for k, v in value.items()}
    return check_beta(value, BETA_ENV, fix)


def resolve_betas(stored: dict[str, float] | None, moe_layers: list[int],
                  override: str | None = None) -> dict[int, float]:
    """beta per MoE layer to serve with: the checkpoint's betas, replaced by the MOESVD_SKIP_BETA override
    (`override` defaults to the environment). Layers with beta 0 are left out (nothing to skip)."""
    override = os.environ.get(BETA_ENV) if override is None else override
    betas = {str(i): b for i, b in (stored or {}).items()}
    if override is not None and override.strip():
        value = parse_override(override)
        if value is None:
            return {}
        if isinstance(value, float):
            betas = {str(i): value for i in moe_layers}
        else:
            unknown = sorted(set(value) - {str(i) for i in moe_layers})
            if unknown:
                raise SkippingError(f"{BETA_ENV} names layer(s) {unknown}, which are not MoE layers of this "
                                    f"model (MoE layers: {moe_layers}); name only those")
            betas.update(value)
    return {int(k): b for k, b in betas.items() if b > 0.0}
