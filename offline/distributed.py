"""The compressor across processes and machines, on torch.distributed (no RPC of our own).

`moesvd compress` under torchrun (`torchrun --nproc-per-node N moesvd compress ...`) runs one rank per
process: gloo on the CPU, NCCL on GPUs. The work is split two ways:

* calibration windows: rank r runs the batches r, r + N, r + 2N, ... through every layer; the statistics
  are summed over ranks: counts with `all_reduce`, the layer-wide float64 sums (Grams, activation sums)
  exactly (`exact_sum`, offline/exact_sum.py), so that they do not depend on the number of ranks;
* experts: the per-expert stages (neuron selection, the fits) visit the experts (or U-trimming groups) in
  rounds of N; in a round every rank sends its windows' rows of each item to the item's owner
  (`batches_in_order`), which forms the item's Grams from them in batch order, as one process does, and
  fits it; then the results are broadcast from their owners (`share`) and applied by every rank in item
  order, so every rank holds the same compressed layer.

Rank 0 is the one writer. One process (no torchrun) is `Ranks()`: every collective is a no-op and the
pipeline runs exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from moesvd_vllm.errors import MoESVDError
from offline.exact_sum import ExactSum

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(MoESVDError):
    """torch.distributed could not be set up for the compression."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the compression's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ----------------------------------------------------------------------------------- splitting
    def my_share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of `items` (every `size`-th, starting at `rank`)."""
        return list(items[self.rank::self.size])

    def owner(self, position: int) -> int:
        return position % self.size

    def rounds(self, items: Sequence[T]) -> Iterator[list[tuple[int, T]]]:
        """`items` in rounds of `size`: [(owner, item), ...], item j of a round owned by rank j."""
        for start in range(0, len(items), self.size):
            yield [(self.owner(start + j), item) for j, item in enumerate(items[start:start + self.size])]

    # ----------------------------------------------------------------------------------- collectives
    def all_reduce(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over ranks, in place (every rank gets the same values)."""
        if self.distributed:
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_reduce_int(self, value: int) -> int:
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def exact_sum(self, total: ExactSum) -> ExactSum:
        """The sum over ranks of every rank's `total`, on every rank: exact until read, so the same
        float64 values as one process that added all the terms itself (offline/exact_sum.py)."""
        if not self.distributed:
            return total
        pair = total.pair().to(self.device)
        gathered = [torch.empty_like(pair) for _ in range(self.size)]
        dist.all_gather(gathered, pair)
        return ExactSum.of_pairs([g.to(total.hi.device) for g in gathered])

    def batches_in_order(self, tensors: list[torch.Tensor], segments: list[int], owner: int | None
                         ) -> tuple[list[torch.Tensor], list[int]] | None:
        """Rows that this rank holds for its calibration batches (`segments`: rows per batch, batches r,
        r + N, ... in order), with every other rank's, in global batch order: what one process holds.
        On `owner` (None on the other ranks), or on every rank when `owner` is None."""
        if not self.distributed:
            return tensors, segments
        meta: list[Any] = [None] * self.size  # every rank's segments and dtypes
        dist.all_gather_object(meta, (segments, [str(t.dtype) for t in tensors]))
        every_segments = [m[0] for m in meta]
        longest = max(sum(s) for s in every_segments)
        # a rank without rows (fewer batches than ranks) made empty tensors of a guessed dtype: use the
        # dtype of the first rank that has rows, so every rank's collective sees the same dtype
        holder = next((m for m in meta if sum(m[0]) > 0), meta[self.rank])
        received = []
        for tensor, dtype_name in zip(tensors, holder[1]):
            dtype = getattr(torch, dtype_name.removeprefix("torch."))
            padded = torch.zeros((longest, *tensor.shape[1:]), dtype=dtype, device=self.device)
            padded[:tensor.shape[0]] = tensor.to(self.device)
            if owner is None:
                gathered = [torch.empty_like(padded) for _ in range(self.size)]
                dist.all_gather(gathered, padded)
            else:
                gathered = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == owner else None
                dist.gather(padded, gathered, dst=owner)
            received.append(gathered)
        if owner is not None and owner != self.rank:
            return None
        pieces: dict[int, list[torch.Tensor]] = {}  # global batch index -> its rows of each tensor
        for r, rank_segments in enumerate(every_segments):
            start = 0
            for j, count in enumerate(rank_segments):
                pieces[r + j * self.size] = [g[r][start:start + count] for g in received]
                start += count
        order = sorted(pieces)
        if not order:
            return [t[:0] for t in tensors], []
        out = [torch.cat([pieces[b][i] for b in order]).to(t.device) for i, t in enumerate(tensors)]
        return out, [pieces[b][0].shape[0] if tensors else 0 for b in order]

    def share(self, result: dict[str, Any] | None, owner: int) -> dict[str, Any]:
        """`result` (tensors and plain values) of rank `owner`, on every rank: the layout first, as one
        object, then each tensor by its own broadcast on the device (NCCL moves GPU tensors directly)."""
        if not self.distributed:
            assert result is not None
            return result
        layout = [None]
        if self.rank == owner:
            layout = [{k: (("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v))
                       for k, v in result.items()}]
        dist.broadcast_object_list(layout, src=owner, device=self._object_device())
        shared: dict[str, Any] = {}
        for key, (kind, *rest) in layout[0].items():
            if kind == "value":
                shared[key] = rest[0]
                continue
            shape, dtype = rest
            tensor = (result[key].to(self.device).contiguous() if self.rank == owner
                      else torch.empty(shape, dtype=dtype, device=self.device))
            dist.broadcast(tensor, src=owner)
            shared[key] = tensor
        return shared

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if not self.distributed:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` [n_r, ...] concatenated in rank order (the ranks' row counts may differ)."""
        if not self.distributed:
            return rows
        counts = [0] * self.size
        dist.all_gather_object(counts, rows.shape[0])
        padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        padded[:rows.shape[0]] = rows.to(self.device)
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, counts)]).to(rows.device)

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> tuple[Ranks, bool]:
    """This process's `Ranks` (and whether this call started the process group): under torchrun
    (WORLD_SIZE > 1) the default group is started with NCCL on CUDA devices, gloo on the CPU."""
    if not launched_by_torchrun():
        return Ranks(device=device), False
    started = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise DistributedError("this torch has no NCCL: run the GPUs' compression with a CUDA build of "
                                   "torch, or on the CPU with --device cpu (gloo)")
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group(backend, device_id=device)
            else:
                dist.init_process_group(backend)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"could not start torch.distributed ({backend}): {exc}; check torchrun's "
                                   "--nnodes/--node-rank/--master-addr/--master-port") from exc
        started = True
    ranks = Ranks(rank=dist.get_rank(), size=dist.get_world_size(), device=device)
    logger.info("rank %d of %d on %s (%s)", ranks.rank, ranks.size, device, dist.get_backend())
    return ranks, started


def stop(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()
