"""Stage 1 of `moesvd recover`: layer by layer, each decomposed MoE block matched to the dense block.

The teacher (dense checkpoint) runs one decoder layer at a time (`offline.layerwise.LayerwiseModel`, as
compression does): at a decomposed layer the dense MoE block's inputs X and outputs Y on the distillation
windows are captured, the block's experts are then swapped for the compressed ones (the stored factors
and bases, as trainable parameters; the router too with `train_routers`), and Adam minimises the
relative block-output error

    || block_student(X) - Y ||^2 / || Y ||^2        over random batches of `stage1_batch_tokens` tokens,

with a cosine-decayed learning rate relative to each tensor's RMS (`relative_adam`). `inputs` chooses what
is passed on to the next layer: "teacher" (the dense layer's outputs: every block learns the dense
block's function on the dense model's activations), or "student" (the recovered layer's outputs, as
compression's propagate="compressed": each block learns the dense block's function on the activations
the recovered model will actually feed it, so it can also absorb the earlier layers' remaining error).
In memory: one decoder layer (dense + compressed experts), the windows' hidden states, and X, Y of the
current layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from offline.layerwise import LayerInputs, LayerwiseModel
from offline.recover_params import CompressedSource, StoredParameter, set_trainable, trainable_parameters, \
    unique_parameters

logger = logging.getLogger(__name__)

EVAL_CHUNK_TOKENS = 4096  # tokens per no-grad forward when measuring a block's error


def relative_adam(parameters: list[nn.Parameter], lr: float, steps: int
                  ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam whose step size for each tensor is `lr` times that tensor's RMS (factors, bases and routers
    live at different scales), cosine-decayed to zero over `steps`."""
    groups = [{"params": [p], "lr": lr * max(float(p.detach().float().pow(2).mean().sqrt()), 1e-8)}
              for p in parameters]
    optimizer = torch.optim.Adam(groups)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))


@dataclass(frozen=True)
class Stage1Settings:
    steps: int
    lr: float
    batch_tokens: int
    batch_size: int  # windows per teacher forward
    train_routers: bool
    inputs: str  # "teacher" or "student": whose outputs are passed on (module docstring)
    seed: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class LayerResult:
    layer: int
    error_before: float  # relative block-output error on the training tokens
    error_after: float
    probe_before: float  # on the probe windows (not trained on)
    probe_after: float
    seconds: float  # the whole layer: build, teacher pass, training, error measurements
    train_seconds: float  # the Adam steps alone


def _to_device(inputs: LayerInputs, device: torch.device) -> LayerInputs:
    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return LayerInputs(move(inputs.attention_mask), {k: move(v) for k, v in inputs.layer_masks.items()},
                       move(inputs.position_ids), tuple(move(t) for t in inputs.position_embeddings))


class _BlockCapture:
    """Forward hook on a MoE block: its inputs and outputs, flattened to [T, H]."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def hook(self, module, args, output) -> None:
        hidden = args[0]
        out = output[0] if isinstance(output, tuple) else output
        self.inputs.append(hidden.detach().reshape(-1, hidden.shape[-1]))
        self.outputs.append(out.detach().reshape(-1, out.shape[-1]))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.inputs), torch.cat(self.outputs)


@torch.no_grad()
def block_error(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """|| block(x) - y ||^2 / || y ||^2 (float64 sums over chunks)."""
    num, den = 0.0, 0.0
    for start in range(0, x.shape[0], EVAL_CHUNK_TOKENS):
        xs, ys = x[start:start + EVAL_CHUNK_TOKENS], y[start:start + EVAL_CHUNK_TOKENS]
        pred = block(xs.unsqueeze(0)).reshape(ys.shape)
        num += float((pred - ys).double().pow(2).sum())
        den += float(ys.double().pow(2).sum())
    return num / den if den > 0 else 0.0


def train_block(block: nn.Module, stored: list[StoredParameter], x: torch.Tensor, y: torch.Tensor,
                settings: Stage1Settings, generator: torch.Generator, desc: str) -> None:
    """Adam on the relative block-output error over random token batches (see the module docstring)."""
    set_trainable(block, stored)
    optimizer, schedule = relative_adam(unique_parameters(stored), settings.lr, settings.steps)
    energy = y.pow(2).sum(-1).mean().clamp_min(torch.finfo(y.dtype).tiny)
    batch = min(settings.batch_tokens, x.shape[0])
    order = torch.randperm(x.shape[0], generator=generator)
    cursor = 0
    for _ in tqdm(range(settings.steps), desc=desc, leave=False, disable=None):
        if cursor + batch > order.numel():
            order, cursor = torch.randperm(x.shape[0], generator=generator), 0
        idx = order[cursor:cursor + batch].to(x.device)
        cursor += batch
        optimizer.zero_grad(set_to_none=True)
        pred = block(x[idx].unsqueeze(0)).reshape(batch, -1)
        loss = (pred - y[idx]).pow(2).sum(-1).mean() / energy
        loss.backward()
        optimizer.step()
        schedule.step()
    set_trainable(block, [])


def _batches(windows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [windows[i:i + size] for i in range(0, windows.shape[0], size)]


class _Stream:
    """The hidden states of a set of windows at the current layer, with their layer inputs."""

    def __init__(self, teacher: LayerwiseModel, windows: torch.Tensor, settings: Stage1Settings):
        self.hidden, self.inputs = [], []
        for ids in _batches(windows, settings.batch_size):
            h = teacher.embed(ids).to(settings.dtype)
            self.inputs.append(_to_device(teacher.layer_inputs(h, None), settings.device))
            self.hidden.append(h.to(settings.device))

    def advance(self, teacher: LayerwiseModel, layer: nn.Module, index: int) -> list[torch.Tensor]:
        """Run the layer; returns the hidden states it consumed (to run it again after training)."""
        before = self.hidden
        self.hidden = [teacher.run_layer(layer, index, h, inp) for h, inp in zip(self.hidden, self.inputs)]
        return before


def run_stage1(teacher: LayerwiseModel, student: CompressedSource, train: torch.Tensor, probe: torch.Tensor,
               settings: Stage1Settings, sink: Callable[[str, torch.Tensor], None]) -> list[LayerResult]:
    """Train every decomposed layer in turn; hand each trained tensor (on CPU) to `sink(name, tensor)`."""
    import time

    generator = torch.Generator().manual_seed(settings.seed)
    decomposed = student.block.decomposed_layers
    streams = _Stream(teacher, train, settings), _Stream(teacher, probe, settings)
    results: list[LayerResult] = []
    logger.info("stage 1: %d decomposed layer(s), %d steps each, %d training tokens", len(decomposed),
                settings.steps, train.numel())
    for index in tqdm(range(max(decomposed) + 1), desc="stage 1 (layer-wise)", disable=None):
        started = time.perf_counter()
        layer = teacher.build_layer(index).to(device=settings.device, dtype=settings.dtype)
        block = teacher.moe_block(layer) if index in decomposed else None
        captures, consumed = [], []
        for stream in streams:  # the training windows, then the probe windows
            capture = _BlockCapture()
            handle = block.register_forward_hook(capture.hook) if block is not None else None
            try:
                consumed.append(stream.advance(teacher, layer, index))
            finally:
                if handle is not None:
                    handle.remove()
            captures.append(capture)
        if block is not None:
            (x, y), (px, py) = (c.tensors() for c in captures)
            del captures
            block.experts = student.build_experts(index, block.experts.act_fn, settings.dtype).to(settings.device)
            student.load_block_parameters(block, index)
            stored = trainable_parameters(block.experts, block, student.spec(index), student.model_type, index,
                                          settings.train_routers)
            before, probe_before = block_error(block, x, y), block_error(block, px, py)
            clock = time.perf_counter()
            train_block(block, stored, x, y, settings, generator, f"layer {index}")
            trained = time.perf_counter() - clock
            result = LayerResult(index, before, block_error(block, x, y), probe_before,
                                 block_error(block, px, py), time.perf_counter() - started, trained)
            logger.info("stage 1 layer %d: relative block error %.4g -> %.4g (probe %.4g -> %.4g), %.1f s "
                        "(%.1f s training)", index, result.error_before, result.error_after, result.probe_before,
                        result.probe_after, result.seconds, result.train_seconds)
            results.append(result)
            for s in stored:
                sink(s.name, s.value().cpu())
            del x, y, px, py
            if settings.inputs == "student":  # pass the recovered layer's outputs on instead
                for stream, hidden in zip(streams, consumed):
                    stream.hidden = hidden
                    stream.advance(teacher, layer, index)
        del consumed
        del layer, block
    return results
