"""The per-expert baselines "svd" and "whitened-svd": every expert's gate, up and down truncated to one rank.

Each weight W is replaced by W ~= b a (the `per_expert` form's lora_b [out, r], lora_a [r, in]): the plain
truncated SVD, or with `whitened` the activation-weighted SVD of SVD-LLM (Eq. 11-12: W S = U Sigma V^T with
S S^T the Gram of W's inputs, W ~= U_r Sigma_r V_r^T S^{-1}). All MoE layers at one rank by default (no
sensitivity selection); evaluated by offline.reference, not servable on the fused MoE kernels.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from moesvd_vllm.architectures import MoEDims
from moesvd_vllm.format.schema import LayerSpec
from offline import decompose as dec
from offline.heap import release_heap_every_few_experts
from offline.methods.base import CompressedLayer, CompressionMethod, LayerWork
from offline.methods.experts import ErrorSums, ExpertGrams, layer_experts, write_expert


class PerExpertSVD(CompressionMethod):
    """Shared code of the two baselines; `whitened` chooses the SVD."""

    form = "per_expert"
    servable = False  # evaluated by offline.reference only
    selection = "all"
    whitened: ClassVar[bool]

    def rank_steps(self, dims: MoEDims) -> tuple[int, int]:
        return min(dims.hidden, dims.intermediate), self.options.baseline_rank_step

    def compress_layer(self, work: LayerWork) -> CompressedLayer:
        num_experts, where, rank = work.dims.num_experts, f"layer {work.index}", work.shape.rank
        experts = layer_experts(work.model, work.layer)
        grams = ExpertGrams(work.stats, self.options, work.ranks)  # summed on every rank: the fits repeat there
        layout, prefix, model_dtype = work.layout, work.prefix, work.model_dtype
        errors = ErrorSums()
        for e in range(num_experts):
            release_heap_every_few_experts(e)
            gram_in, gram_mid = grams.input(e), grams.mid(e)
            s_in = dec.whitening_factor(gram_in, f"{where} expert {e} input") if self.whitened else None
            s_mid = dec.whitening_factor(gram_mid, f"{where} expert {e} down input") if self.whitened else None
            approx = {}
            for key, proj, weight, s, gram in (("gate", layout.gate_proj, experts.gate[e], s_in, gram_in),
                                               ("up", layout.up_proj, experts.up[e], s_in, gram_in),
                                               ("down", layout.down_proj, experts.down[e], s_mid, gram_mid)):
                low = dec.truncated_svd(weight, rank, s)
                a, b = low.a.to(model_dtype), low.b.to(model_dtype)
                work.emit(f"{prefix}.experts.{e}.{proj}.lora_a", a)
                work.emit(f"{prefix}.experts.{e}.{proj}.lora_b", b)
                approx[key] = b.double() @ a.double()  # what the checkpoint computes, from the stored factors
                errors.add({key: dec.whitened_error(weight, approx[key], gram)})
            if work.write_back:
                dtype = experts.gate.dtype
                write_expert(work.model, work.layer, e, torch.cat([approx["gate"], approx["up"]]).to(dtype),
                             approx["down"].to(dtype))
        spec = LayerSpec(form=self.form, rank=rank, num_experts=num_experts, bank_map=list(range(num_experts)),
                         sensitivity=work.sensitivity)  # no bases
        return CompressedLayer(spec, work.emit.written, errors.relative())


class PlainSVD(PerExpertSVD):
    name = "svd"
    summary = "plain truncated SVD per expert (baseline; not servable)"
    whitened = False


class WhitenedSVD(PerExpertSVD):
    name = "whitened-svd"
    summary = "activation-whitened SVD per expert, SVD-LLM style (baseline; not servable)"
    whitened = True
