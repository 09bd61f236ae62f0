""""shared-core" (seed 001): per projection one core shared by the layer's experts, per-expert low-rank
wrappers W_e ~= (1 + U_out V_out^T) C (1 + U_in V_in^T); the math is offline/shared_core.py.

Zero-shot: C = mean of the experts, U = 0, then Adam on the activation-weighted error (the experts'
regularised Grams). All MoE layers at one rank r (no sensitivity selection; the plan picks the r that
meets the ratio: 3 I H + 6 E r (H + I) parameters per layer). Offline only: the "shared_core" form is
evaluated by offline.reference and refused by the plugin (vLLM's fused MoE kernels need a dense weight
per expert); `moesvd recover` trains its cores and wrappers like any other stored factors.
"""

from __future__ import annotations

import torch

from moesvd_vllm.architectures import MoEDims
from moesvd_vllm.format.schema import LayerSpec
from offline.methods.base import CompressedLayer, CompressionMethod, LayerWork
from offline.methods.experts import ExpertGrams, layer_experts, write_expert
from offline.shared_core import FitSettings, fit_shared_core, layer_tensors


class SharedCore(CompressionMethod):
    name = "shared-core"
    summary = ("seed 001: a shared core per projection + per-expert low-rank wrappers, fitted zero-shot "
               "(offline; not servable)")
    form = "shared_core"
    servable = False  # evaluated by offline.reference only (module docstring)
    selection = "all"

    def rank_steps(self, dims: MoEDims) -> tuple[int, int]:
        return min(dims.hidden, dims.intermediate), 1

    def compress_layer(self, work: LayerWork) -> CompressedLayer:
        experts = layer_experts(work.model, work.layer)
        grams = ExpertGrams(work.stats, self.options, work.ranks)  # summed on every rank: the fit repeats there
        rank, num_experts = work.shape.rank, work.dims.num_experts
        factors, errors = fit_shared_core(experts.gate, experts.up, experts.down, grams.input, grams.mid, rank,
                                          FitSettings(seed=self.options.seed), f"layer {work.index}")
        layout = work.layout
        names = {"gate": layout.gate_proj, "up": layout.up_proj, "down": layout.down_proj}
        stored = layer_tensors(factors, work.prefix, names, work.model_dtype)
        for name, tensor in stored.items():
            work.emit(name, tensor)
        if work.write_back:  # what the checkpoint computes, from the stored (rounded) factors
            rounded = {proj: type(f)(*(t.to(work.model_dtype).float() for t in
                                       (f.core, f.in_u, f.in_v, f.out_u, f.out_v)))
                       for proj, f in factors.items()}
            weights = {proj: f.weights().to(experts.gate.dtype) for proj, f in rounded.items()}
            for e in range(num_experts):
                write_expert(work.model, work.layer, e, torch.cat([weights["gate"][e], weights["up"][e]]),
                             weights["down"][e])
        spec = LayerSpec(form=self.form, rank=rank, num_experts=num_experts, bank_map=list(range(num_experts)),
                         sensitivity=work.sensitivity)
        return CompressedLayer(spec, work.emit.written, errors)
