"""The per-layer statistics MoE-SVD needs (the calibration data itself: offline/calibration_data.py).

Statistics (per MoE layer, `ExpertStatistics`), gathered by a forward pre-hook on the layer's routed
`experts` module, which receives the MoE block input x [T, H] and the router's top-k choice [T, k]:
* routing counts for f_i (Eq. 9): tokens whose top-k contains expert i, padding excluded;
* activation-outlier ratio a_i (Eq. 10): the share of the expert's intermediate activations
  act(W_gate x) * (W_up x) whose magnitude exceeds tau times their mean magnitude;
* Gram matrices in float64 (App. D.2): X_i^T X_i of the tokens routed to expert i (input of gate/up) and
  Y_i^T Y_i of the expert's intermediate activations (input of down), plus the whole layer's X^T X.
  The per-expert ones are formed on demand, one expert at a time, from the kept routed inputs
  (`RoutedInputs`): holding all of them is O(E H^2), 3.6x a bf16 layer at Qwen3-30B-A3B shapes.

The same statistics from 1 or N processes, bit for bit: the layer-wide float64 sums are exact sums
(offline/exact_sum.py) until read, and an expert's Grams are formed from all ranks' rows in batch order
(`Ranks.batches_in_order`), never by adding per-rank partial Grams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from offline.distributed import Ranks
from offline.exact_sum import ExactSum

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ statistics
GRAM_CHUNK_ROWS = 4096  # rows per float32 Gram GEMM; the partial Grams are summed in float64


def gram(rows: torch.Tensor, scale: torch.Tensor | None = None, segments: list[int] | None = None,
         other: torch.Tensor | None = None) -> torch.Tensor:
    """X^T diag(scale^2) X in float64 [H, H] for X = `rows` [T, H]; with `other` Z [T, H'] the cross Gram
    X^T diag(scale^2) Z [H, H'] (same chunks, same sums).

    float32 GEMMs over chunks of `GRAM_CHUNK_ROWS` rows, accumulated in float64: about 2x the speed of a
    float64 GEMM, relative difference to it ~1e-7 on bf16/float32 inputs, three orders below the damping
    (`damp` 1e-4 of the mean diagonal) that regularises every Gram before it is factored.

    `segments` (row counts summing to T, the rows of each calibration batch): no chunk spans two, so the
    float32 partials and their float64 sum are the same as one process's when the rows are all of them in
    batch order (offline/distributed.py)."""
    columns = rows if other is None else other
    out = torch.zeros(rows.shape[1], columns.shape[1], dtype=torch.float64, device=rows.device)
    first = 0
    for count in (segments if segments is not None else [rows.shape[0]]):
        for start in range(first, first + count, GRAM_CHUNK_ROWS):
            end = min(start + GRAM_CHUNK_ROWS, first + count)
            x = rows[start:end].float()
            z = x if other is None else other[start:end].float()
            if scale is not None:
                x = x * scale[start:end, None].float()
                z = x if other is None else z * scale[start:end, None].float()
            out += (x.T @ z).double()
        first += count
    return out


@dataclass
class RoutedInputs:
    """The MoE block inputs of one layer's real calibration tokens with the router's top-k choice.

    Kept instead of per-expert Gram matrices ([E, H, H] float64 is 3.6x the bf16 layer at Qwen3-30B-A3B
    shapes): each expert's Grams are formed from its routed rows when it is decomposed, one at a time."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch [T_b, H], compute dtype
    top_k_index: list[torch.Tensor] = field(default_factory=list)  # per batch [T_b, k]
    top_k_weights: list[torch.Tensor] = field(default_factory=list)  # per batch [T_b, k]
    batch_tokens: list[int] = field(default_factory=list)  # T_b of each batch, in order
    _order: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def append(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self.batch_tokens.append(hidden.shape[0])
        self.hidden.append(hidden)
        self.top_k_index.append(top_k_index)
        self.top_k_weights.append(top_k_weights)
        self._order = None

    def _expert_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token of each routed slot sorted by expert, its routing weight, start offset of each expert)."""
        if self._order is None:
            if len(self.hidden) > 1:  # one tensor each from here on (the batches are not kept twice)
                self.hidden = [torch.cat(self.hidden)]
                self.top_k_index = [torch.cat(self.top_k_index)]
                self.top_k_weights = [torch.cat(self.top_k_weights)]
            index = self.top_k_index[0] if self.top_k_index else torch.zeros(0, 1, dtype=torch.int64)
            weights = self.top_k_weights[0] if self.top_k_weights else torch.zeros(0, 1)
            device = index.device
            flat = index.reshape(-1)
            slots = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=int(flat.max()) + 1 if flat.numel() else 1)
            offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
            offsets[1:] = torch.cumsum(counts, 0)
            self._order = (slots // index.shape[1], weights.reshape(-1)[slots], offsets)
        return self._order

    def expert_rows(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs routed to `expert` [T_e, H] (token order) and their routing weights [T_e]."""
        tokens, weights, offsets = self._expert_order()
        if not self.hidden or expert + 1 >= offsets.numel():
            return self.hidden[0][:0] if self.hidden else torch.zeros(0, 0), weights[:0]
        start, end = int(offsets[expert]), int(offsets[expert + 1])
        return self.hidden[0][tokens[start:end]], weights[start:end]

    def expert_segments(self, expert: int) -> list[int]:
        """How many of `expert_rows(expert)` come from each batch (the rows are in token order)."""
        tokens, _, offsets = self._expert_order()
        if not self.hidden or expert + 1 >= offsets.numel():
            return []
        mine = tokens[int(offsets[expert]):int(offsets[expert + 1])]
        ends = torch.tensor(self.batch_tokens, device=mine.device).cumsum(0)
        cuts = torch.searchsorted(mine, ends).tolist()  # rows before the end of each batch
        return [b - a for a, b in zip([0] + cuts[:-1], cuts)]


@dataclass
class ExpertStatistics:
    """Per-expert calibration statistics of one MoE layer.

    With `collect_grams`, the routed inputs are kept (`routed`) and each expert's Grams are formed on
    demand (`input_gram`, `mid_gram`) from them and the layer's `experts` module; call those before the
    module's weights are replaced (they define the intermediate activations)."""

    num_experts: int
    hidden: int
    intermediate: int
    collect_grams: bool = True
    routing_weighted: bool = False  # scale each routed token by its routing weight in the Grams
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the sums live
    routed_tokens: torch.Tensor = field(init=False)  # [E] tokens routed to each expert (Eq. 9 numerator)
    total_tokens: int = field(init=False, default=0)  # real (unpadded) tokens seen
    num_activations: torch.Tensor = field(init=False)  # [E]
    routed: RoutedInputs | None = field(init=False, default=None)  # inputs + top-k choice (Grams on demand)
    experts: nn.Module | None = field(init=False, default=None, repr=False)  # the layer's routed experts
    outliers: torch.Tensor | None = field(init=False, default=None)  # [E] counts above tau*mean
    # the float64 sums, exact until read (offline/exact_sum.py); read through the properties below
    sums: dict[str, ExactSum] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        e, at = self.num_experts, dict(device=self.device)
        self.routed_tokens = torch.zeros(e, dtype=torch.int64, **at)
        self.num_activations = torch.zeros(e, dtype=torch.int64, **at)
        self.sums["abs"] = ExactSum((e,), self.device)
        if self.collect_grams:
            self.routed = RoutedInputs()
            self.sums["mid"] = ExactSum((self.intermediate, self.intermediate), self.device)
            self.sums["layer"] = ExactSum((self.hidden, self.hidden), self.device)
            self.sums["out"] = ExactSum((self.hidden, self.hidden), self.device)

    def _sum(self, name: str) -> torch.Tensor | None:
        return self.sums[name].value() if name in self.sums else None

    @property
    def abs_sum(self) -> torch.Tensor:
        """[E] sum of |activation| over the expert's activations."""
        return self._sum("abs")

    @property
    def gram_mid_sum(self) -> torch.Tensor | None:
        """[I, I] sum over experts of Y_e^T Y_e (the prior of every expert's intermediate Gram)."""
        return self._sum("mid")

    @property
    def gram_layer(self) -> torch.Tensor | None:
        """[H, H] X^T X of all real tokens of the layer."""
        return self._sum("layer")

    @property
    def gram_out(self) -> torch.Tensor | None:
        """[H, H] y^T y of the routed experts' combined output."""
        return self._sum("out")

    @property
    def frequency(self) -> torch.Tensor:
        """f_i (Eq. 9): share of real tokens that routed to expert i (sums to top_k)."""
        return self.routed_tokens.double() / max(self.total_tokens, 1)

    @property
    def mean_abs_activation(self) -> torch.Tensor:
        return self.abs_sum / self.num_activations.clamp(min=1).double()

    def outlier_ratio(self) -> torch.Tensor:
        """a_i (Eq. 10); needs the outlier-counting sweep (`count_outliers`) to have run."""
        if self.outliers is None:
            raise RuntimeError("outlier counts were not collected for this layer")
        return self.outliers.double() / self.num_activations.clamp(min=1).double()

    def expert_inputs(self, expert: int, ranks: Ranks | None, owner: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]] | None:
        """The expert's routed rows, their routing weights (with `routing_weighted`) and rows per batch,
        of every rank's batches in batch order (`Ranks.batches_in_order`), on `owner` (None elsewhere;
        owner None: on every rank)."""
        if self.routed is None:
            raise RuntimeError("Gram matrices were not collected for this layer (collect_grams=False)")
        rows, weights = self.routed.expert_rows(expert)
        segments = self.routed.expert_segments(expert)
        if rows.shape[-1] != self.hidden:  # no routed inputs at all (a rank without calibration windows)
            rows, weights, segments = torch.zeros(0, self.hidden, device=self.device), torch.zeros(0), []
        gathered = (ranks or Ranks()).batches_in_order([rows, weights], segments, owner)
        if gathered is None:
            return None
        (rows, weights), segments = gathered
        return rows, (weights if self.routing_weighted else None), segments

    def input_gram(self, expert: int, ranks: Ranks | None = None, owner: int | None = None
                   ) -> torch.Tensor | None:
        """X_e^T X_e [H, H] float64 over the tokens routed to `expert` (App. D.2), each row scaled by its
        routing weight with `routing_weighted` (the block output scales expert e's output by it). With
        `ranks`: over every rank's tokens, on `owner` only (None elsewhere) or on every rank."""
        inputs = self.expert_inputs(expert, ranks, owner)
        return None if inputs is None else gram(*inputs)

    def mid_gram(self, expert: int, ranks: Ranks | None = None, owner: int | None = None
                 ) -> torch.Tensor | None:
        """Y_e^T Y_e [I, I] float64 of the expert's intermediate activations (the input of its down
        projection), recomputed from its routed inputs with the `experts` module; `ranks` and `owner`
        as for `input_gram`."""
        inputs = self.expert_inputs(expert, ranks, owner)
        if inputs is None:
            return None
        rows, weights, segments = inputs
        if rows.shape[0] == 0:
            return torch.zeros(self.intermediate, self.intermediate, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            activations = expert_activations(self.experts, expert, rows)
        return gram(activations, weights, segments)

    def sum_over_ranks(self, ranks: Ranks) -> None:
        """Every rank's sums added up (each rank saw its own calibration windows), in place; the routed
        inputs stay per rank (an expert's Grams gather them when formed)."""
        if not ranks.distributed:
            return
        self.total_tokens = ranks.all_reduce_int(self.total_tokens)
        ranks.all_reduce(self.routed_tokens, self.num_activations)
        self.sums = {name: ranks.exact_sum(total) for name, total in self.sums.items()}

    def sum_outliers_over_ranks(self, ranks: Ranks) -> None:
        if ranks.distributed:
            if self.outliers is None:
                self.outliers = torch.zeros(self.num_experts, dtype=torch.int64, device=self.device)
            ranks.all_reduce(self.outliers)

    @property
    def gram_in(self) -> torch.Tensor:
        """All experts' input Grams [E, H, H] float64: small layers and tests only."""
        return torch.stack([self.input_gram(e) for e in range(self.num_experts)])

    @property
    def gram_mid(self) -> torch.Tensor:
        """All experts' intermediate Grams [E, I, I] float64: small layers and tests only."""
        return torch.stack([self.mid_gram(e) for e in range(self.num_experts)])


def expert_activations(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """act(W_gate x) * (W_up x) of one expert of a transformers-5 fused experts module."""
    return gated_activations(experts.gate_up_proj[expert], experts.act_fn, x)


def gated_activations(gate_up: torch.Tensor, act_fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(W_gate x) * (W_up x) for a fused [gate; up] weight [2I, H] (x in its dtype)."""
    gate, up = nn.functional.linear(x.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
    return act_fn(gate) * up


class ExpertStatisticsHook:
    """Forward pre-hook on a routed `experts` module that feeds `ExpertStatistics`.

    Set `token_mask` ([B*L] bool, True = real token) before each batch; padding never counts.
    With `outlier_threshold` set (tau * mean |activation| per expert, from a first sweep), the hook counts
    outliers instead of accumulating sums and Grams.
    """

    def __init__(self, stats: ExpertStatistics, experts: nn.Module):
        self.stats = stats
        self.experts = experts
        stats.experts = experts
        self.token_mask: torch.Tensor | None = None
        self.outlier_threshold: torch.Tensor | None = None
        self._handle = experts.register_forward_pre_hook(self._hook)
        self._out_handle = experts.register_forward_hook(self._output_hook)

    def remove(self) -> None:
        self._handle.remove()
        self._out_handle.remove()

    def _output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Gram of the routed experts' combined output y = sum_e w_e E_e(x) (real tokens only)."""
        if self.outlier_threshold is not None or "out" not in self.stats.sums:
            return
        self.stats.sums["out"].add(gram(output.reshape(-1, output.shape[-1])[self.token_mask.reshape(-1)]))

    def _hook(self, module: nn.Module, args: tuple) -> None:
        hidden, top_k_index, top_k_weights = args[0], args[1], args[2]
        if self.token_mask is None:
            raise RuntimeError("ExpertStatisticsHook.token_mask must be set before running a batch")
        mask = self.token_mask.reshape(-1)
        hidden, top_k_index, top_k_weights = hidden[mask], top_k_index[mask], top_k_weights[mask]
        with torch.no_grad():
            if self.outlier_threshold is None:
                self._accumulate(hidden, top_k_index, top_k_weights)
            else:
                self._count_outliers(hidden, top_k_index)

    def _accumulate(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        s = self.stats
        s.total_tokens += hidden.shape[0]
        if s.routed is not None:
            s.sums["layer"].add(gram(hidden))
            s.routed.append(hidden, top_k_index, top_k_weights)
        abs_sums = torch.zeros(s.num_experts, dtype=torch.float64, device=s.device)
        mid_sum = None
        for expert in range(s.num_experts):
            routed = (top_k_index == expert).any(dim=-1)
            count = int(routed.sum())
            if count == 0:
                continue
            act = expert_activations(self.experts, expert, hidden[routed])
            s.routed_tokens[expert] += count
            abs_sums[expert] = act.abs().double().sum()
            s.num_activations[expert] += act.numel()
            if "mid" in s.sums:  # the prior of every expert's intermediate Gram
                w = (top_k_weights[routed] * (top_k_index[routed] == expert)).sum(-1)
                part = gram(act, w if s.routing_weighted else None)
                mid_sum = part if mid_sum is None else mid_sum.add_(part)  # one batch: the same in every layout
        s.sums["abs"].add(abs_sums)
        if mid_sum is not None:
            s.sums["mid"].add(mid_sum)

    def _count_outliers(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        s = self.stats
        if s.outliers is None:
            s.outliers = torch.zeros(s.num_experts, dtype=torch.int64, device=s.device)
        for expert in range(s.num_experts):
            routed = (top_k_index == expert).any(dim=-1)
            if not routed.any():
                continue
            act = expert_activations(self.experts, expert, hidden[routed])
            s.outliers[expert] += int((act.abs() > self.outlier_threshold[expert]).sum())
