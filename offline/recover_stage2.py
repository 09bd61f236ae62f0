"""Stage 2 of `moesvd recover`: end to end, KL(teacher || student) of the next-token distributions.

Teacher (dense) and student (the compressed checkpoint as `offline.reference` builds it, with stage 1's
tensors loaded) are whole models in memory; only the stored factors and bases of the decomposed layers
(and the routers with `train_routers`) are trained, with `relative_adam` (stage 1) on

    KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)),   averaged over every position of a batch.

Memory (`stage2_memory_bytes`, checked against what the machine has before anything runs): both models'
weights, the trainable tensors' gradients and Adam moments, and the activations kept for the backward
pass, dominated at large vocabularies by the logits. That is small for the bundled models; for a
Qwen3-30B-A3B-class model it is tens of GB (the bf16 teacher alone is 61 GB), so there stage 2 needs a
machine that holds both models (or stage 1 alone, which streams one layer at a time).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from moesvd_vllm.errors import MoESVDError
from offline.recover_params import StoredParameter, set_trainable, trainable_parameters, unique_parameters
from offline.recover_stage1 import relative_adam
from offline.reference import _moe_block, load_reference_model

logger = logging.getLogger(__name__)


class Stage2MemoryError(MoESVDError):
    """Stage 2 would not fit in the memory of the chosen device."""


@dataclass(frozen=True)
class Stage2Settings:
    steps: int
    lr: float
    batch_size: int
    train_routers: bool
    seed: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Stage2Result:
    kl_before: float  # mean per-token KL(teacher || student) on the training windows, nats
    kl_after: float
    probe_kl_before: float  # on the probe windows
    probe_kl_after: float
    seconds: float


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def model_parameter_count(model_dir) -> int:
    """Parameters of the original architecture of `model_dir` (dense or compressed), counted on the meta
    device (nothing is read or allocated)."""
    from transformers import AutoModelForCausalLM

    from offline.reference import original_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(original_config(model_dir))
    return sum(p.numel() for p in model.parameters())


def stage2_memory_bytes(config: dict, dense_params: int, student_params: int, trainable: int, batch_size: int,
                        seq_len: int, dtype_bytes: int) -> int:
    """A lower bound of stage 2's memory: teacher and student weights, gradients and two Adam moments of
    the `trainable` parameters (float32), and per layer the activations autograd keeps (about 16
    hidden-sized tensors per token: attention, norms, expert inputs and outputs) plus three logit copies."""
    layers = int(config["num_hidden_layers"])
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    tokens = batch_size * seq_len
    activations = tokens * (16 * hidden * layers + 3 * vocab) * dtype_bytes
    return (dense_params + student_params) * dtype_bytes + 3 * trainable * 4 + activations


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_stage2_memory(teacher_dir, config: dict, block_config, trainable: int, settings: "Stage2Settings",
                        seq_len: int) -> int:
    """Refuse (Stage2MemoryError) before anything runs when stage 2 cannot fit; returns the estimate."""
    dense = model_parameter_count(teacher_dir)
    student = dense - block_config.params.expert_dense + block_config.params.expert_compressed
    need = stage2_memory_bytes(config, dense, student, trainable, settings.batch_size, seq_len,
                               torch.finfo(settings.dtype).bits // 8)
    have = available_bytes(settings.device)
    logger.info("stage 2 needs at least %.2f GiB on %s (%.2f GiB available)", need / 2**30, settings.device,
                have / 2**30)
    if need > have:
        raise Stage2MemoryError(
            f"stage 2 (end-to-end KL) needs at least {need / 2**30:.1f} GiB on {settings.device} (teacher and "
            f"student weights, the trained tensors' gradients and Adam state, activations of {settings.batch_size}"
            f" x {seq_len} tokens), {have / 2**30:.1f} GiB are available: run stage 1 only (--no-stage2), a "
            "smaller --batch-size / --seq-len, or a machine with more memory. Nothing was written.")
    return need


def student_parameters(student: nn.Module, block_config, model_type: str, train_routers: bool
                       ) -> list[StoredParameter]:
    stored: list[StoredParameter] = []
    for index in block_config.decomposed_layers:
        moe = _moe_block(student, index)
        stored += trainable_parameters(moe.experts, moe, block_config.layer(index), model_type, index, train_routers)
    return stored


@torch.no_grad()
def mean_kl(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int,
            device: torch.device) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        kl = kl_teacher_student(teacher(input_ids=ids).logits, student(input_ids=ids).logits)
        total += float(kl) * ids.numel()
        count += ids.numel()
    return total / max(count, 1)


def run_stage2(teacher_dir, compressed_dir, block_config, model_type: str, trained: dict[str, torch.Tensor],
               train: torch.Tensor, probe: torch.Tensor, settings: Stage2Settings
               ) -> tuple[Stage2Result, dict[str, torch.Tensor]]:
    """Train end to end from the compressed checkpoint with `trained` (stage 1's tensors) loaded; returns
    the result and every trained tensor by on-disk name (on CPU)."""
    import time

    started = time.perf_counter()
    teacher = load_reference_model(teacher_dir, dtype=settings.dtype).to(settings.device).eval()
    student = load_reference_model(compressed_dir, dtype=settings.dtype).to(settings.device).eval()
    stored = student_parameters(student, block_config, model_type, settings.train_routers)
    for s in stored:
        if s.name in trained:
            s.load(trained[s.name])
    set_trainable(student, stored)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    kl_before = mean_kl(teacher, student, train, settings.batch_size, settings.device)
    probe_before = mean_kl(teacher, student, probe, settings.batch_size, settings.device)
    optimizer, schedule = relative_adam(unique_parameters(stored), settings.lr, settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    order, cursor = torch.randperm(train.shape[0], generator=generator), 0
    progress = tqdm(range(settings.steps), desc="stage 2 (end-to-end KL)", disable=None)
    for _ in progress:
        if cursor + settings.batch_size > order.numel():
            order, cursor = torch.randperm(train.shape[0], generator=generator), 0
        ids = train[order[cursor:cursor + settings.batch_size]].to(settings.device)
        cursor += settings.batch_size
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        optimizer.zero_grad(set_to_none=True)
        loss = kl_teacher_student(teacher_logits, student(input_ids=ids).logits)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(kl=f"{float(loss.detach()):.4f}")
    set_trainable(student, [])
    result = Stage2Result(kl_before, mean_kl(teacher, student, train, settings.batch_size, settings.device),
                          probe_before, mean_kl(teacher, student, probe, settings.batch_size, settings.device),
                          time.perf_counter() - started)
    logger.info("stage 2: KL(teacher || student) %.4g -> %.4g nats/token (probe %.4g -> %.4g), %.1f s",
                result.kl_before, result.kl_after, result.probe_kl_before, result.probe_kl_after, result.seconds)
    return result, {s.name: s.value().cpu().clone() for s in stored}
