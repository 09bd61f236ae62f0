"""Dynamic expert skipping, offline: betas chosen from calibration, the PyTorch reference's rule, and
checkpoints that only add skipping to a dense model.

The rule itself (keep the top-1 and every chosen expert with w_j >= beta * w_1) is moesvd_vllm/skipping.py,
shared with the vLLM plugin. Per MoE layer the compressor observes the router's final top-k weights of the
real calibration tokens (a forward pre-hook on the MoE block's `experts`, which transformers 5 calls with
(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])) and picks beta by
* "median": NAEE's rule (Lu et al., 2024): beta = median over tokens of w_2 / w_1 (second over first);
* a target skip fraction f: beta = the f-quantile of w_j / w_1 over all non-top-1 pairs, so a share f of
  them falls below it on the calibration data;
* a number: that beta for every layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moesvd_vllm.architectures import architecture, module_moe_block, moe_layer_indices
from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.schema import SkippingSpec
from moesvd_vllm.skipping import SkippingError, check_beta, keep_mask, kept_weights

logger = logging.getLogger(__name__)

SKIP_FIX = "use --skip-beta none|median|<number in [0, 1]> or --skip-target <fraction in [0, 1)>"


# ------------------------------------------------------------------------------------------ options
def parse_skip_beta(value: str) -> str:
    """'none', 'median' or a beta in [0, 1] (kept as text: the option is recorded in the checkpoint)."""
    text = str(value).strip().lower()
    if text in ("none", "median"):
        return text
    try:
        number = float(text)
    except ValueError:
        raise SkippingError(f"--skip-beta {value!r} is not 'none', 'median' or a number; {SKIP_FIX}") from None
    check_beta(number, "--skip-beta", SKIP_FIX)
    return text


@dataclass(frozen=True)
class SkipChoice:
    """How the compressor picks beta per MoE layer (None: no skipping)."""

    beta: str = "none"  # "none" | "median" | a number
    target: float | None = None  # target share of non-top-1 pairs skipped on the calibration data

    def __post_init__(self):
        parse_skip_beta(self.beta)
        if self.target is not None:
            if isinstance(self.target, bool) or not 0.0 <= self.target < 1.0:
                raise SkippingError(f"--skip-target must be in [0, 1), got {self.target!r}; {SKIP_FIX}")
            if self.beta != "none":
                raise SkippingError(f"--skip-beta {self.beta} and --skip-target {self.target} both given; {SKIP_FIX}")

    @property
    def active(self) -> bool:
        return self.beta != "none" or self.target is not None

    @property
    def selection(self) -> str:
        return "target_fraction" if self.target is not None else (
            "median_ratio" if self.beta == "median" else "fixed")


# ------------------------------------------------------------------------------------------ calibration
def ratios_to_top1(top_k_weights: torch.Tensor) -> torch.Tensor:
    """[T, k-1]: the other chosen experts' weights over the top-1 weight, in descending order."""
    ordered = top_k_weights.float().sort(dim=-1, descending=True).values
    return ordered[:, 1:] / ordered[:, :1].clamp_min(torch.finfo(torch.float32).tiny)


class RoutingRatios:
    """Forward pre-hook on a MoE block's `experts` keeping w_j / w_1 of every call (one call per batch)."""

    def __init__(self, experts: nn.Module):
        self.calls: list[torch.Tensor] = []
        self._handle = experts.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls.append(ratios_to_top1(args[2].detach()))

    def remove(self) -> None:
        self._handle.remove()

    def real_tokens(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """The ratios of the real (unpadded) tokens, given each batch's [B, L] mask."""
        if len(self.calls) != len(masks):
            raise RuntimeError(f"saw {len(self.calls)} MoE calls for {len(masks)} batches")
        return torch.cat([r[m.reshape(-1)] for r, m in zip(self.calls, masks)])


def choose_beta(ratios: torch.Tensor, choice: SkipChoice) -> float:
    """beta of one layer from its calibration ratios [N, k-1] (see the module docstring)."""
    if ratios.numel() == 0:
        return 0.0
    if choice.target is not None:
        return float(torch.quantile(ratios.reshape(-1).double(), choice.target))
    if choice.beta == "median":
        return float(ratios[:, 0].double().median())
    return float(choice.beta)


def skip_fraction(ratios: torch.Tensor, beta: float) -> float:
    """Share of non-top-1 pairs the rule skips (w_j < beta * w_1)."""
    return float((ratios < beta).double().mean()) if ratios.numel() else 0.0


class SkipCalibration:
    """The compressor's hook: watches each MoE layer's routing while the pipeline runs it, then the spec."""

    def __init__(self, choice: SkipChoice, moe_layers: list[int]):
        self.choice = choice
        self.moe_layers = moe_layers
        self.betas: dict[str, float] = {}
        self.fractions: dict[str, float] = {}
        # this process's ratios -> every process's (offline/distributed.py: calibration windows are split)
        self.gather: Callable[[torch.Tensor], torch.Tensor] = lambda ratios: ratios

    @property
    def active(self) -> bool:
        return self.choice.active

    @contextlib.contextmanager
    def watching(self, experts: nn.Module, index: int, masks: list[torch.Tensor]):
        if not self.active or index not in self.moe_layers:
            yield
            return
        ratios = RoutingRatios(experts)
        try:
            yield
        finally:
            ratios.remove()
        real = self.gather(ratios.real_tokens(masks))
        beta = choose_beta(real, self.choice)
        self.betas[str(index)] = beta
        self.fractions[str(index)] = skip_fraction(real, beta)
        logger.info("layer %d: skip beta %.4f skips %.1f%% of non-top-1 calibration pairs", index, beta,
                    100 * self.fractions[str(index)])

    def spec(self) -> SkippingSpec | None:
        if not self.active:
            return None
        missing = sorted(set(self.moe_layers) - {int(k) for k in self.betas})
        if missing:
            raise AssertionError(f"MoE layers {missing} were not run during calibration")
        return SkippingSpec(betas=dict(self.betas), selection=self.choice.selection,
                            target_skip_fraction=self.choice.target,
                            calibration_skip_fraction=dict(self.fractions))


# ------------------------------------------------------------------------------------------ reference
class SkippingExperts(nn.Module):
    """A MoE block's `experts` with the rule applied to the router's weights (the PyTorch reference).

    Skipped pairs get weight 0 (exactly nothing added); the kept ones are renormalised as the
    architecture's router does (architectures.Routing.renormalizes)."""

    def __init__(self, experts: nn.Module, beta: float, renormalize: bool):
        super().__init__()
        self.inner = experts
        self.beta = beta
        self.renormalize = renormalize
        self.routed_pairs = 0  # counts since construction (offline/skip_quality.py reads them)
        self.skipped_pairs = 0

    def forward(self, hidden_states, top_k_index, top_k_weights):
        keep = keep_mask(top_k_weights, self.beta)
        self.routed_pairs += keep.numel()
        self.skipped_pairs += int((~keep).sum())
        weights = kept_weights(top_k_weights, keep, self.renormalize).to(top_k_weights.dtype)
        return self.inner(hidden_states, top_k_index, weights)


def install_reference_skipping(model: nn.Module, betas: dict[int, float], config: dict) -> None:
    """Wrap the `experts` of every MoE layer with beta > 0 in `model` (a transformers causal LM)."""
    renormalize = architecture(config["model_type"]).routing.renormalizes(config)
    for index, beta in betas.items():
        block = model.get_submodule(module_moe_block(config["model_type"], index))
        block.experts = SkippingExperts(block.experts, beta, renormalize)
    if betas:
        logger.info("reference: expert skipping with beta per MoE layer %s", betas)


class SkipOnlyError(MoESVDError):
    """`moesvd skip` cannot write a skipping checkpoint of this model."""


def moe_layers_of(model_dir: str | os.PathLike) -> list[int]:
    from moesvd_vllm.format.directories import read_config

    return moe_layer_indices(read_config(Path(model_dir)))
