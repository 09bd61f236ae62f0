""""moe-svd-stacked", the default: intermediate-neuron selection first, then the rank of shared bases.

The plan reduces each expert's intermediate neurons first (offline/slimming.py), down to
`min_intermediate_fraction` = 1/2 of I, and only then lowers the rank r of bases shared by all experts of
the layer (measured better than either alone on the bundled model, docs/results.md). With
`basis_groups` G > 1 the experts form G groups with their own pair of bases each (App. D.4; G = E: every
expert its own, `--basis-groups E --min-intermediate-fraction 1`, the best quality on fine-grained
experts in the results protocol, but slower to serve at small batches on CPUs without native bf16,
docs/performance.md). The bases:

* A [r, H] (input side): the top-r right singular subspace of all experts' gate and up rows, stacked,
  whitened by the layer's input Gram and weighted by routing frequency: MoE-SVD's V-sharing (Eq. 5-6)
  with a subspace shared by all experts in place of the most frequent expert's;
* B [H, r] (output side): with `output_basis="block"` the top-r principal subspace of the routed MoE
  output y = sum_e w_e E_e(x) (minimises the block's output error exactly); with "experts" the top-r
  left singular subspace of all experts' whitened down projections.

With `basis_groups` G > 1 each group of E/G experts gets its own pair: A_g whitened by the Gram of the
tokens routed to the group's experts (the sum of their input Grams) and B_g from the group's whitened
down projections (the block output mixes all groups, so "block" applies to G = 1 only).

Per-expert factors by whitened least squares (offline/methods/shared_basis.py); no U-trimming by default.
"""

from __future__ import annotations

import torch

from offline import decompose as dec
from offline.expert_tensors import LayerExperts
from offline.methods.base import LayerWork
from offline.methods.experts import ExpertGrams
from offline.methods.shared_basis import SharedBasisMethod


class StackedSharedBases(SharedBasisMethod):
    name = "moe-svd-stacked"
    summary = "neuron selection, then shared bases of all experts (the default; servable)"
    min_intermediate_fraction = 0.5
    trim_keep = None

    def shared_bases(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams, rank: int,
                     members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        stats, where = work.stats, f"layer {work.index}"
        in_weights = (torch.cat([experts.gate[e], experts.up[e]]) for e in members)
        if len(members) == work.dims.num_experts:
            basis_in = dec.stacked_input_basis(in_weights, stats.routed_tokens.double(), stats.gram_layer, rank,
                                               where)
        else:  # a group's bases (D.4): whitened by the Gram of the tokens routed to the group's experts
            group_gram = sum(grams.input(e) for e in members)
            basis_in = dec.stacked_input_basis(in_weights, stats.routed_tokens.double()[members], group_gram,
                                               rank, f"{where} experts {members[0]}-{members[-1]}")
        if self.options.output_basis == "block" and len(members) == work.dims.num_experts:
            basis_out = dec.block_output_basis(stats.gram_out, rank)
        else:  # the block output mixes every group: a group's basis comes from its experts' whitened downs
            basis_out = dec.stacked_output_basis((experts.down[e] for e in members), (grams.mid(e) for e in members),
                                                 rank)
        return basis_in, basis_out
