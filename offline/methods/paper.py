""""moe-svd", the paper's method: the most frequently routed expert's bases, shared, and U-trimming.

V-matrix sharing (Eq. 5-6): the expert with the highest routing frequency f_i (Eq. 9) gives the bases of
all experts of the layer, A from the right singular vectors of its whitened [gate; up] and B from the left
singular vectors of its whitened down projection (the activation-weighted SVD of Eq. 11-12). Every
expert's own factors are then fitted on them by whitened least squares.

U-matrix trimming (Eq. 7-8): in each group of `trim_group_size` experts only the `trim_keep` = 2 most
frequently routed keep their factors; every other expert is served by the kept expert of its group that
reproduces it best (App. D.4 groups DeepSeek's 64 experts in 8 groups). Ranks only (no neuron selection).
D.4 also shares V within each group only: `basis_groups` = E / `trim_group_size` gives every group the
bases of its own most frequent expert.
"""

from __future__ import annotations

import torch

from moesvd_vllm.architectures import MoEDims
from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.schema import RANK_MULTIPLE
from offline import decompose as dec
from offline.expert_tensors import LayerExperts
from offline.methods.base import LayerWork
from offline.methods.experts import ExpertGrams
from offline.methods.shared_basis import SharedBasisMethod


class MostFrequentExpertBases(SharedBasisMethod):
    name = "moe-svd"
    summary = "the paper: the most frequent expert's bases and U-trimming (servable)"
    min_intermediate_fraction = 1.0
    trim_keep = 2

    def rank_steps(self, dims: MoEDims) -> tuple[int, int]:
        # Eq. 5-6 take both bases from ONE expert: its down projection [H, I] has rank <= I, so with
        # fine-grained experts (I < H) the rank cannot exceed I (rounded down to the kernel's multiple).
        largest = min(dims.hidden, dims.intermediate) // RANK_MULTIPLE * RANK_MULTIPLE
        if largest < RANK_MULTIPLE:
            raise MoESVDError(
                f"method {self.name!r} needs min(hidden {dims.hidden}, expert intermediate {dims.intermediate}) "
                f">= {RANK_MULTIPLE} (its bases come from one expert; vLLM's kernel needs ranks in multiples of "
                f"{RANK_MULTIPLE}); use the default method (neuron selection) for this model")
        return largest, RANK_MULTIPLE

    def shared_bases(self, work: LayerWork, experts: LayerExperts, grams: ExpertGrams, rank: int,
                     members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # arg max_i f(V_i) of Eq. 5, within the group under D.4's group-wise V-sharing
        top = members[int(torch.argmax(work.stats.routed_tokens[members]))]
        return dec.most_frequent_expert_bases(torch.cat([experts.gate[top], experts.up[top]]), experts.down[top],
                                              grams.input(top), grams.mid(top), rank, f"layer {work.index}")
