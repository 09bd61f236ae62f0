"""The shared-basis family (the servable `shared_basis` form): what "moe-svd-stacked" and "moe-svd" share.

A compressed layer stores two bases shared by all its experts, A [r, H] (input side, the paper's shared
V of Eq. 6) and B [H, r] (output side), and per expert bank the factors G = [G_gate; G_up] [2I', r] and
D [r, I'], so that expert e computes

    down_e(act(G_gate A x) * (G_up A x)),  down_e = B D.

With `basis_groups` G > 1 (App. D.4's group-wise V-sharing) every group of E/G consecutive experts has
its own A_g and B_g, stored stacked ([G r, H] and [H, G r], moesvd_vllm/format/schema.py), and each expert
is fitted against its group's pair; U-trimming groups must then lie inside basis groups.

The members differ only in how the bases are chosen (`shared_bases`). The steps of a layer:
1. neuron selection, when the planned shape keeps I' < I neurons (offline/slimming.py);
2. the bases (none when r = H: the factors are then the slimmed weights themselves);
3. expert by expert, one expert's Grams alive at a time: the whitened least-squares fit
   G = W C A^T (A C A^T)^{-1} (C the expert's input Gram) and D = B^T W_down (with `down_fit` "outputs"
   D = B^T W_down C_x C'^{-1} instead, fitted to the dense expert's output from the activations h' of the
   fitted gate and up: offline/decompose.py), the error terms, and with `write_back` the reconstruction
   written into the layer in place of the dense expert;
4. U-trimming (Eq. 7-8), when `trim_keep` experts are kept per group: the kept experts of a group go
   first and every other expert is served, with `trim_combine` "one", by the kept expert that reproduces
   it best (it shares that bank: Algorithm 3's mapping), or with "sum" by the sum of the kept experts'
   factors, E_i(x) = (U_1 S_1 + U_2 S_2) V_s^T x (Eq. 8 as printed). The sum is a new matrix per trimmed
   expert and vLLM's fused kernel needs one matrix per expert (the activation between the projections is
   not linear), so "sum" stores it as the expert's own bank: it saves no memory when served.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from moesvd_vllm.architectures import MoEDims
from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.safetensors_io import torch_dtype
from moesvd_vllm.format.schema import RANK_MULTIPLE, LayerSpec
from offline import decompose as dec
from offline.expert_tensors import LayerExperts
from offline.heap import release_heap_every_few_experts
from offline.methods.base import CompressedLayer, CompressionMethod, LayerWork
from offline.sensitivity import LayerShape
from offline.methods.experts import ErrorSums, ExpertGrams, layer_experts, write_expert
from offline.slimming import slim_experts_in_place

logger = logging.getLogger(__name__)


@dataclass
class _BankFactors:
    """One expert bank's stored factors: [gate; up] G [2I, r] and down D [r, I] (model dtype)."""

    gate_up: torch.Tensor
    down: torch.Tensor


def reconstruct(factor: torch.Tensor, basis: torch.Tensor | None, dtype: torch.dtype,
                basis_first: bool = False) -> torch.Tensor:
    """factor @ basis (or basis @ factor) in `dtype`: a float32 GEMM of the stored (exact in float32)
    values unless the layer computes in float64. No basis (a layer without bases): the factor itself."""
    if basis is None:
        return factor.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    f, b = factor.to(work), basis.to(work)
    return (b @ f if basis_first else f @ b).to(dtype)


def _error_parts(fit: dec.InputFit, down_weight: torch.Tensor, mid_gram: torch.Tensor, factors: _BankFactors,
                 basis_out: torch.Tensor | None, inter: int) -> dict[str, tuple[float, float]]:
    """Whitened errors of one expert's dense weights against `factors` (its own, or under U-trimming a
    kept expert's): gate and up from the fit's terms, down directly (B D is [H, I])."""
    down = factors.down.double() if basis_out is None else basis_out @ factors.down.double()
    return {"gate": fit.error(factors.gate_up[:inter], slice(0, inter)),
            "up": fit.error(factors.gate_up[inter:], slice(inter, None)),
            "down": dec.whitened_error(down_weight, down, mid_gram)}


_PROJECTIONS = ("gate", "up", "down")


class _OutputErrors:
    """With `down_fit` "outputs": the experts' relative output error on their calibration tokens,
    sum_e ||D'_e h'_e - W_e h_e||^2 / sum_e ||W_e h_e||^2, with the refitted down factors and with the
    weight fit D = B^T W they replace (the report's "down_outputs" and "down_outputs_weight_fit")."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)

    def add(self, terms: torch.Tensor) -> None:
        self.sums += terms.cpu()

    def relative(self) -> dict[str, float]:
        fit, weight, energy = self.sums.tolist()
        if energy <= 0:
            return {}
        return {"down_outputs": fit / energy, "down_outputs_weight_fit": weight / energy}


def _summed_factors(kept: list[_BankFactors]) -> _BankFactors:
    """Eq. 8: U_{i,1} S_{i,1} + U_{i,2} S_{i,2} (and likewise the down factors), summed in float32 and
    rounded once to the model dtype (float64 for a float64 model)."""
    dtype = kept[0].gate_up.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gate_up = sum(f.gate_up.to(work) for f in kept).to(dtype)
    down = sum(f.down.to(work) for f in kept).to(dtype)
    return _BankFactors(gate_up, down)


def num_banks(num_experts: int, keep: int | None, group_size: int) -> int:
    """Banks left by U-trimming `keep` experts per group of `group_size` (all experts without trimming)."""
    if keep is None:
        return num_experts
    return sum(min(keep, min(group_size, num_experts - s)) for s in range(0, num_experts, group_size))


class SharedBasisMethod(CompressionMethod):
    """Shared machinery of the shared-basis methods; members set `name` and implement `shared_bases`."""

    form = "shared_basis"
    servable = True
    selection = "sensitivity"
    supports_neuron_selection = True

    def shared_bases(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams, rank: int,
                     members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, H], B [H, r]) shared by the experts `members` (all of the layer's unless `basis_groups` > 1)
        of the layer of `work` (experts already slimmed), float64."""
        raise NotImplementedError

    def counting_spec(self, dims: MoEDims, shape: LayerShape) -> LayerSpec:
        groups = self._basis_groups(dims)
        spec = super().counting_spec(dims, shape)
        return dataclasses.replace(spec, basis_groups=groups if shape.bases else 1)

    def _basis_groups(self, dims: MoEDims) -> int:
        """`basis_groups`, checked against the layer's experts and U-trimming's groups."""
        groups, experts = self.options.basis_groups, dims.num_experts
        if experts % groups:
            raise MoESVDError(f"--basis-groups {groups} does not divide the {experts} routed experts per layer; "
                              f"pick a divisor of {experts} (1 or {experts}, for example)")
        trimming = self.options.effective_trim_keep is not None and self.options.trim_combine == "one"
        if groups > 1 and trimming and (experts // groups) % self.options.trim_group_size:
            raise MoESVDError(f"U-trimming groups of {self.options.trim_group_size} experts do not lie inside "
                              f"basis groups of {experts // groups}; give --trim-group-size a divisor of "
                              f"{experts // groups} (App. D.4: the same groups)")
        return groups

    def rank_steps(self, dims: MoEDims) -> tuple[int, int]:
        return dims.hidden, RANK_MULTIPLE  # the fused-MoE kernel's rank granularity

    def planned_banks(self, dims: MoEDims) -> int:
        if self.options.trim_combine == "sum":
            return dims.num_experts  # Eq. 8's sums are stored, one bank per expert
        return num_banks(dims.num_experts, self.options.effective_trim_keep, self.options.trim_group_size)

    def compress_layer(self, work: LayerWork) -> CompressedLayer:
        """The steps of the module docstring for one layer. Step 3 runs in rounds of U-trimming groups
        (one expert each without trimming), one group per rank and round (offline/distributed.py): every
        rank adds its share of the group's Grams on the group's owner, the owner fits the group, and the
        results are shared and applied (emitted, written back) by every rank in group order."""
        options, stats, shape, ranks = self.options, work.stats, work.shape, work.ranks
        num_experts, inter = work.dims.num_experts, work.dims.intermediate
        experts = layer_experts(work.model, work.layer)
        grams = ExpertGrams(stats, options, ranks)
        neurons, slimming_error = self._select_neurons(work, experts, grams)
        basis_dtype_name = options.basis_dtype_for(work.model_dtype)
        basis_in, basis_out = self._stored_bases(work, experts, grams, torch_dtype(basis_dtype_name))
        groups, kept_by_group = self._trimming_groups(work)
        stored = range(num_experts) if options.trim_combine == "sum" else (e for kept in kept_by_group for e in kept)
        bank_of = {e: bank for bank, e in enumerate(sorted(stored))}
        source = list(range(num_experts))  # the expert whose factors serve each expert
        errors, output_errors = ErrorSums(), _OutputErrors()
        for round_ in ranks.rounds(list(zip(groups, kept_by_group))):
            fitted: dict[int, dict] = {}  # this rank's group of the round: expert -> its fit's outcome
            for owner, (group, kept) in round_:
                order = kept + [e for e in group if e not in kept]  # kept experts first
                refit = [e for e in kept if self._fits_outputs(basis_in)]  # `down_fit` "outputs": their rows
                received = {e: (grams.input(e, owner), grams.mid(e, owner),
                                grams.routed_inputs(e, owner) if e in refit else None) for e in order}
                if owner == ranks.rank:
                    fitted = self._fit_group(work, experts, grams, order, kept, received, basis_in, basis_out)
                del received
            for owner, (group, kept) in round_:
                factors: dict[int, _BankFactors] = {}  # the group's kept experts
                for e in kept + [e for e in group if e not in kept]:
                    outcome = ranks.share(fitted.pop(e, None), owner)
                    source[e] = outcome["source"]
                    errors.add({name: tuple(pair) for name, pair in zip(_PROJECTIONS, outcome["parts"].tolist())})
                    if "outputs" in outcome:
                        output_errors.add(outcome["outputs"])
                    if "gate_up" in outcome:  # a bank of its own: kept, or Eq. 8's sum
                        factors[e] = _BankFactors(outcome["gate_up"], outcome["down"])
                        self._emit_bank(work, bank_of[e], factors[e], neurons[e])
                    if work.write_back:
                        chosen = factors[source[e]]
                        group_in, group_out = self._group_bases(work, basis_in, basis_out, e)
                        write_expert(work.model, work.layer, e,
                                     reconstruct(chosen.gate_up, group_in, experts.gate.dtype),
                                     reconstruct(chosen.down, group_out, experts.gate.dtype, basis_first=True))
        bank_map = [bank_of[source[e]] for e in range(num_experts)]
        spec = LayerSpec(form=self.form, rank=shape.rank, num_experts=num_experts, bank_map=bank_map,
                         basis_dtype=basis_dtype_name, sensitivity=work.sensitivity,
                         intermediate=shape.intermediate if shape.intermediate < inter else None,
                         bases=shape.bases, basis_groups=self._basis_groups(work.dims) if shape.bases else 1)
        relative = errors.relative()
        if slimming_error is not None:
            relative["slimming"] = slimming_error
        relative.update(output_errors.relative())
        return CompressedLayer(spec, work.emit.written, relative)

    def _fit_group(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams, order: list[int],
                   kept: list[int], received: dict[int, tuple], basis_in: torch.Tensor | None,
                   basis_out: torch.Tensor | None) -> dict[int, dict]:
        """Step 3 (and 4) for one group on its owner: per expert the expert whose factors serve it, the
        error terms of that choice and, for a kept expert, its factors."""
        inter = work.dims.intermediate
        factors: dict[int, _BankFactors] = {}
        outcome: dict[int, dict] = {}
        for e in order:
            release_heap_every_few_experts(e)
            gram_in, mid_gram, inputs = received[e]
            group_in, group_out = self._group_bases(work, basis_in, basis_out, e)
            own, fit = self._fit_expert(work, experts, gram_in, e, group_in, group_out)
            output_errors = None
            if inputs is not None:  # kept experts only: a trimmed one is served by other factors
                own, output_errors = self._fit_down_to_outputs(work, experts, grams, inputs, e, own, group_in,
                                                               group_out)
            if e in kept:
                candidates = {e: own}
            elif self.options.trim_combine == "sum":
                candidates = {e: _summed_factors([factors[k] for k in kept])}
            else:
                candidates = {k: factors[k] for k in kept}
            parts = {k: _error_parts(fit, experts.down[e], mid_gram, f, group_out, inter)
                     for k, f in candidates.items()}
            # U-trimming (Eq. 7-8): the kept expert that reproduces e best (whitened distance)
            chosen = min(parts, key=lambda k: (sum(num for num, _ in parts[k].values()), k))
            outcome[e] = {"source": chosen, "parts": torch.tensor([parts[chosen][n] for n in _PROJECTIONS],
                                                                   dtype=torch.float64, device=gram_in.device)}
            if e in kept:
                factors[e] = own
            if chosen == e:  # a bank of its own: kept, or Eq. 8's sum
                outcome[e].update(gate_up=candidates[e].gate_up, down=candidates[e].down)
            if output_errors is not None:
                outcome[e]["outputs"] = output_errors
            del fit, mid_gram
        return outcome

    def _select_neurons(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams
                        ) -> tuple[list[torch.Tensor], float | None]:
        """Step 1: (kept neurons per expert, the down error of the selection) when the shape keeps fewer
        than I neurons; the layer's experts are rewritten in place and the later steps fit those."""
        inter, keep = work.dims.intermediate, work.shape.intermediate
        if keep >= inter:
            return [torch.arange(inter, device=experts.down.device)] * work.dims.num_experts, None
        slimming = slim_experts_in_place(experts.gate, experts.up, experts.down, grams.mid, keep,
                                         after_expert=release_heap_every_few_experts, ranks=work.ranks)
        logger.info("layer %d: kept %d of %d neurons per expert, relative down error %.4g",
                    work.index, keep, inter, slimming.error)
        return slimming.kept, slimming.error

    def _stored_bases(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams,
                      basis_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Step 2: the bases as stored (rounded to `basis_dtype`, held in float64), emitted; (None, None)
        for a layer without bases (r = H: the factors are the slimmed expert weights themselves)."""
        if not work.shape.bases:
            return None, None
        size = work.dims.num_experts // self._basis_groups(work.dims)
        pairs = [self.shared_bases(work, experts, grams, work.shape.rank, list(range(start, start + size)))
                 for start in range(0, work.dims.num_experts, size)]
        # the stored (rounded) bases are what the server multiplies with: fit the factors against them
        basis_in = torch.cat([a for a, _ in pairs]).to(basis_dtype).double()  # [G r, H]
        basis_out = torch.cat([b for _, b in pairs], dim=1).to(basis_dtype).double()  # [H, G r]
        work.emit(f"{work.prefix}.moe_svd_in.weight", basis_in.to(basis_dtype))
        work.emit(f"{work.prefix}.moe_svd_out.weight", basis_out.to(basis_dtype))
        return basis_in, basis_out

    def _group_bases(self, work: LayerWork, basis_in: torch.Tensor | None, basis_out: torch.Tensor | None,
                     expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert `expert`'s group's (A_g, B_g): views of the stacked bases (None without bases)."""
        if basis_in is None:
            return None, None
        rank = work.shape.rank
        group = expert // (work.dims.num_experts // self._basis_groups(work.dims))
        rows = slice(group * rank, (group + 1) * rank)
        return basis_in[rows], basis_out[:, rows]

    def _trimming_groups(self, work: LayerWork) -> tuple[list[list[int]], list[list[int]]]:
        """Step 4's groups and the experts each keeps (its `trim_keep` most frequently routed); without
        trimming every expert is its own group and kept."""
        num_experts = work.dims.num_experts
        keep, size = self.options.effective_trim_keep, self.options.trim_group_size
        if keep is None or keep >= min(size, num_experts):
            groups = [[e] for e in range(num_experts)]
            return groups, groups
        groups = dec.trimming_groups(num_experts, size)
        return groups, [dec.kept_in_group(work.stats.frequency, g, keep) for g in groups]

    @staticmethod
    def _fit_expert(work: LayerWork, experts: LayerExperts, gram_in: torch.Tensor, e: int,
                    basis_in: torch.Tensor | None, basis_out: torch.Tensor | None
                    ) -> tuple[_BankFactors, dec.InputFit]:
        """Step 3 for expert e: its own factors (model dtype) and the input fit (for the error terms)."""
        gate_up = torch.cat([experts.gate[e], experts.up[e]])
        fit = dec.identity_fit(gate_up, gram_in) if basis_in is None else dec.fit_input(gate_up, basis_in, gram_in)
        down = experts.down[e] if basis_out is None else dec.fit_output_factor(experts.down[e], basis_out)
        return _BankFactors(fit.factor.to(work.model_dtype), down.to(work.model_dtype)), fit

    def _fits_outputs(self, basis_in: torch.Tensor | None) -> bool:
        """`down_fit` "outputs" on a layer whose gate and up change (without an input basis they are exact)."""
        return self.options.down_fit == "outputs" and basis_in is not None

    @staticmethod
    def _fit_down_to_outputs(work: LayerWork, experts: LayerExperts, grams: ExpertGrams,
                             inputs: tuple[torch.Tensor, torch.Tensor | None, list[int]], e: int,
                             own: _BankFactors, basis_in: torch.Tensor, basis_out: torch.Tensor | None
                             ) -> tuple[_BankFactors, torch.Tensor | None]:
        """`down_fit` "outputs": expert e's down factor refitted to reproduce its dense output from the
        activations of its fitted gate and up as the checkpoint computes them (decompose.py), and the
        output errors on its calibration tokens (`_OutputErrors`: refitted, weight fit, dense energy)."""
        dense = torch.cat([experts.gate[e], experts.up[e]])
        fitted = reconstruct(own.gate_up, basis_in, dense.dtype)
        act_fn = work.model.moe_block(work.layer).experts.act_fn
        data = grams.output_fit(inputs, dense, fitted, act_fn)
        if data is None:  # never routed: nothing to fit to, the weight projection stays
            return own, None
        down = dec.fit_output_factor_to_outputs(experts.down[e], basis_out, data.cross, data.gram)
        refitted = _BankFactors(own.gate_up, down.to(work.model_dtype))
        served = [reconstruct(f.down, basis_out, dense.dtype, basis_first=True) for f in (refitted, own)]
        (fit_error, energy), (weight_error, _) = (data.output_error(experts.down[e], d) for d in served)
        terms = torch.tensor([fit_error, weight_error, energy], dtype=torch.float64, device=data.dense.device)
        return refitted, terms

    @staticmethod
    def _emit_bank(work: LayerWork, bank: int, factors: _BankFactors, rows: torch.Tensor) -> None:
        """A kept expert's factors as bank `bank`, only its kept neurons' rows (gate, up) and columns (down)."""
        inter, layout = work.dims.intermediate, work.layout
        name = f"{work.prefix}.experts.{bank}"
        work.emit(f"{name}.{layout.gate_proj}.weight", factors.gate_up[:inter][rows].contiguous())
        work.emit(f"{name}.{layout.up_proj}.weight", factors.gate_up[inter:][rows].contiguous())
        work.emit(f"{name}.{layout.down_proj}.weight", factors.down[:, rows].contiguous())
