"""The shared-core decomposition of seed 001: one dense core per projection, per-expert low-rank wrappers.

For every projection p of a MoE layer (gate, up: [I, H]; down: [H, I]) the E experts' weights are
approximated as

    W_e ~= (1 + U_out,e V_out,e^T) C (1 + U_in,e V_in,e^T)        U_in, V_in [d_in, r]; U_out, V_out [d_out, r]

with one core C [d_out, d_in] shared by the layer's experts. Parameters per layer: 3 I H (cores) +
E * 3 * 2 r (H + I) (wrappers); the schema's "shared_core" form stores exactly these.

Zero-shot fit (`fit_shared_core`), as the seed's phase 1: C = mean of the experts, U = 0 and V small random
(each expert starts at the core), then Adam on the activation-weighted reconstruction error of each
projection, sum_e ||(W_e - W^_e) X_e^T||^2 / sum_e ||W_e X_e^T||^2 = sum_e tr(D_e G_e D_e^T) / ...
(G_e = X_e^T X_e, the Gram of the inputs routed to expert e: of x for gate/up, of the intermediate
activations for down), core and wrappers jointly. Cost per Adam step and projection: O(E d_out d_in^2)
(the Gram products); fine at the bundled model's size, about 0.4 TFLOP per step at Qwen3-30B-A3B shapes.

Serving: vLLM's fused MoE kernels take one dense weight per expert; a wrapper around a dense core gives
no such weight short of expanding every expert back to full size, so this form is an offline method,
evaluated by the PyTorch reference (`offline.reference` builds `SharedCoreExperts`); the plugin refuses
it at startup like the per_expert baselines (docs/results.md, Recovery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

PROJECTIONS = ("gate", "up", "down")
WRAPPER_FACTORS = ("in_u", "in_v", "out_u", "out_v")
CORE_PREFIX = "moe_svd_core"


@dataclass
class ProjectionFactors:
    """One projection's shared core and every expert's wrappers."""

    core: torch.Tensor  # [d_out, d_in]
    in_u: torch.Tensor  # [E, d_in, r]
    in_v: torch.Tensor  # [E, d_in, r]
    out_u: torch.Tensor  # [E, d_out, r]
    out_v: torch.Tensor  # [E, d_out, r]

    def weights(self) -> torch.Tensor:
        """W^_e for every expert, [E, d_out, d_in]."""
        return wrapped_weights(self.core, self.in_u, self.in_v, self.out_u, self.out_v)


def wrapped_weights(core: torch.Tensor, in_u: torch.Tensor, in_v: torch.Tensor, out_u: torch.Tensor,
                    out_v: torch.Tensor) -> torch.Tensor:
    """(1 + U_out V_out^T) C (1 + U_in V_in^T) per expert: C + (C U_in) V_in^T + U_out (V_out^T C') with
    C' = C (1 + U_in V_in^T), never forming a d x d identity."""
    inner = core + (core @ in_u) @ in_v.transpose(1, 2)  # [E, d_out, d_in]
    return inner + out_u @ (out_v.transpose(1, 2) @ inner)


# ------------------------------------------------------------------------------------------ zero-shot fit
@dataclass(frozen=True)
class FitSettings:
    steps: int = 300  # Adam steps per projection
    lr: float = 1e-2  # relative: scaled by the RMS of the experts' weights for the core
    seed: int = 0
    init_std: float = 1e-2  # std of V at initialisation (U = 0, so every expert starts at the core)


def _relative_error(diff: torch.Tensor, grams: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """sum_e tr(D_e G_e D_e^T) / norm, D [E, d_out, d_in], G [E, d_in, d_in]."""
    return ((diff @ grams) * diff).sum() / norm


def fit_projection(weights: torch.Tensor, grams: torch.Tensor, rank: int, settings: FitSettings,
                   where: str) -> tuple[ProjectionFactors, float, float]:
    """Zero-shot init + Adam fit of one projection (see the module docstring).

    weights [E, d_out, d_in], grams [E, d_in, d_in] (float32 or float64, regularised by the caller).
    Returns the factors (float32) and the relative error at the mean core and after the fit."""
    work = torch.float32
    w, g = weights.to(work), grams.to(work)
    norm = ((w @ g) * w).sum().clamp_min(torch.finfo(work).tiny)
    num_experts, d_out, d_in = w.shape
    generator = torch.Generator().manual_seed(settings.seed)
    core = nn.Parameter(w.mean(0).clone())
    scale = float(w.pow(2).mean().sqrt())
    in_u = nn.Parameter(torch.zeros(num_experts, d_in, rank))
    out_u = nn.Parameter(torch.zeros(num_experts, d_out, rank))
    in_v = nn.Parameter(torch.randn(num_experts, d_in, rank, generator=generator) * settings.init_std)
    out_v = nn.Parameter(torch.randn(num_experts, d_out, rank, generator=generator) * settings.init_std)
    params = [core, in_u, in_v, out_u, out_v]
    with torch.no_grad():
        start = float(_relative_error(w - core, g, norm))
    # the core lives at the weights' scale; the wrappers are O(1) multipliers
    optimizer = torch.optim.Adam([{"params": [core], "lr": settings.lr * scale},
                                  {"params": params[1:], "lr": settings.lr}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(settings.steps, 1))
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _relative_error(w - wrapped_weights(*params), g, norm)
        loss.backward()
        optimizer.step()
        schedule.step()
    factors = ProjectionFactors(*(p.detach() for p in params))
    with torch.no_grad():
        end = float(_relative_error(w - factors.weights(), g, norm))
    if not end == end or end > start:  # NaN, or the fit made it worse: keep the mean core
        logger.warning("%s: shared-core fit did not improve on the mean core (%.4g -> %.4g); keeping it",
                       where, start, end)
        factors = ProjectionFactors(w.mean(0), torch.zeros_like(in_u), in_v.detach(), torch.zeros_like(out_u),
                                    out_v.detach())
        end = start
    return factors, start, end


def fit_shared_core(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    input_gram: Callable[[int], torch.Tensor], mid_gram: Callable[[int], torch.Tensor],
                    rank: int, settings: FitSettings, where: str
                    ) -> tuple[dict[str, ProjectionFactors], dict[str, float]]:
    """Fit the three projections of one layer: gate/up [E, I, H], down [E, H, I]; `input_gram(e)` [H, H]
    and `mid_gram(e)` [I, I] give expert e's regularised Grams. Returns the factors and, per projection,
    the relative error after the fit (plus `<proj>_mean_core`: at the zero-shot init)."""
    num_experts = gate.shape[0]
    inputs = torch.stack([input_gram(e).float() for e in range(num_experts)])
    factors, errors = {}, {}
    for proj, weight in (("gate", gate), ("up", up)):
        factors[proj], errors[f"{proj}_mean_core"], errors[proj] = fit_projection(
            weight, inputs, rank, settings, f"{where} {proj}")
    del inputs
    mids = torch.stack([mid_gram(e).float() for e in range(num_experts)])
    factors["down"], errors["down_mean_core"], errors["down"] = fit_projection(
        down, mids, rank, settings, f"{where} down")
    return factors, errors


# ------------------------------------------------------------------------------------------ reference module
class SharedCoreExperts(nn.Module):
    """Routed experts in the shared_core form (the PyTorch reference of it; see the module docstring).

    Parameters: `{proj}_core` [d_out, d_in] and `{proj}_{in_u,in_v,out_u,out_v}` [E, d, r] for proj in
    gate, up, down. Frozen as loaded (the recovery unfreezes what it trains)."""

    def __init__(self, factors: dict[str, ProjectionFactors], act_fn: Callable[[torch.Tensor], torch.Tensor],
                 *, dtype: torch.dtype):
        super().__init__()
        for proj in PROJECTIONS:
            f = factors[proj]
            setattr(self, f"{proj}_core", nn.Parameter(f.core.to(dtype).contiguous(), requires_grad=False))
            for name in WRAPPER_FACTORS:
                tensor = getattr(f, name).to(dtype).contiguous()
                setattr(self, f"{proj}_{name}", nn.Parameter(tensor, requires_grad=False))
        self.num_experts = self.gate_in_u.shape[0]
        self.hidden_size = self.down_core.shape[0]
        self.act_fn = act_fn

    def _project(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        in_u, in_v = getattr(self, f"{proj}_in_u")[expert], getattr(self, f"{proj}_in_v")[expert]
        out_u, out_v = getattr(self, f"{proj}_out_u")[expert], getattr(self, f"{proj}_out_v")[expert]
        x = x + (x @ in_v) @ in_u.T  # (1 + U_in V_in^T) x, as row vectors
        y = F.linear(x, getattr(self, f"{proj}_core"))
        return y + (y @ out_v) @ out_u.T

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self._project("gate", expert, x)) * self._project("up", expert, x)
        return self._project("down", expert, hidden)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        from offline.reference import combine_selected_experts

        x = hidden_states.to(self.gate_core.dtype)
        output = combine_selected_experts(x, top_k_index, top_k_weights, self.num_experts, self.hidden_size,
                                          self._expert)
        return output.to(hidden_states.dtype)

    def projection(self, proj: str) -> ProjectionFactors:
        return ProjectionFactors(*(getattr(self, f"{proj}_{name}") for name in ("core",) + WRAPPER_FACTORS))

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The equivalent dense experts: gate/up [E, I, H], down [E, H, I] (float64)."""
        out = []
        for proj in PROJECTIONS:
            f = self.projection(proj)
            out.append(wrapped_weights(*(t.double() for t in (f.core, f.in_u, f.in_v, f.out_u, f.out_v))))
        return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------ names
def tensor_names(prefix: str, projection_names: dict[str, str], num_experts: int
                 ) -> dict[str, tuple[str, str, int | None]]:
    """On-disk name -> (projection, factor, expert or None) of a shared_core layer; `prefix` is the MoE
    block's (`model.layers.L.mlp`), `projection_names` maps gate/up/down to the layout's names."""
    out: dict[str, tuple[str, str, int | None]] = {}
    for proj in PROJECTIONS:
        out[f"{prefix}.{CORE_PREFIX}.{projection_names[proj]}.weight"] = (proj, "core", None)
    for e in range(num_experts):
        for proj in PROJECTIONS:
            for factor in WRAPPER_FACTORS:
                out[f"{prefix}.experts.{e}.{projection_names[proj]}.{factor}"] = (proj, factor, e)
    return out


def layer_tensors(factors: dict[str, ProjectionFactors], prefix: str, projection_names: dict[str, str],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors a shared_core layer stores, in `dtype`."""
    num_experts = factors["gate"].in_u.shape[0]
    out = {}
    for name, (proj, factor, expert) in tensor_names(prefix, projection_names, num_experts).items():
        tensor = getattr(factors[proj], factor)
        out[name] = (tensor if expert is None else tensor[expert]).to(dtype).contiguous()
    return out


def experts_from_tensors(get: Callable[[str], torch.Tensor], prefix: str, projection_names: dict[str, str],
                         num_experts: int, act_fn, dtype: torch.dtype) -> SharedCoreExperts:
    """Build `SharedCoreExperts` from stored tensors (`get(name)`), e.g. CheckpointTensors.get."""
    parts: dict[str, dict[str, list | torch.Tensor]] = {p: {f: [] for f in WRAPPER_FACTORS} for p in PROJECTIONS}
    for name, (proj, factor, expert) in tensor_names(prefix, projection_names, num_experts).items():
        if expert is None:
            parts[proj][factor] = get(name)
        else:
            parts[proj][factor].append(get(name))
    factors = {p: ProjectionFactors(parts[p]["core"], *(torch.stack(parts[p][f]) for f in WRAPPER_FACTORS))
               for p in PROJECTIONS}
    return SharedCoreExperts(factors, act_fn, dtype=dtype)
