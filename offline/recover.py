"""`moesvd recover COMPRESSED --teacher DENSE --data DATA --out OUT`: distil a compressed checkpoint
toward its dense original, writing a checkpoint of the same format (the plugin serves it unchanged).

    from offline.recover import RecoveryOptions, recover
    recover(compressed_dir, out_dir, RecoveryOptions(teacher=dense_dir, data="train.txt"))

What is trained: exactly the tensors the compressed format stores for its decomposed layers (factors and
shared bases, or the per_expert / shared_core factors), and with `train_routers` the routers of those
layers; everything else is copied. Two stages (either may be switched off):
  1. layer-wise (offline/recover_stage1.py): each decomposed MoE block's output matched (relative MSE) to
     the dense block's output on the teacher's activations; one decoder layer in memory;
  2. end to end (offline/recover_stage2.py): KL(teacher || student) of the next-token distributions;
     both models in memory (checked before anything runs).
The data (offline/recover_data.py) never holds held-out text: the bundled test split (and any
`--held-out` file) is refused. The output's `moe_svd` block is the input's, with a record appended to
`moe_svd.options["recovery"]` (a list: one entry per recovery run); `recovery_report.json` holds the
per-layer errors and KLs. Written by the one checkpoint writer (moesvd_vllm/format/writer.py): nothing
exists at OUT until the run is complete, an interrupted run leaves nothing behind and starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moesvd_vllm.errors import CheckpointError, MoESVDError
from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments, option
from offline.recover_checks import check_inputs
from offline.recover_data import bundled_test_split, load_distillation_data

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
STAGE1_INPUTS = ("teacher", "student")
DTYPES = ("float32", "bfloat16")
RECORD_KEY = "recovery"
REPORT_FILE = "recovery_report.json"


class RecoveryOptionsError(MoESVDError):
    """Invalid recovery options."""


@dataclass(frozen=True)
class RecoveryOptions:
    """Everything `recover` needs besides the input and output directories (recorded in the output)."""

    teacher: str = option(help="the dense checkpoint the compressed one was made from")
    data: str = option(help="distillation text: a .txt/.jsonl file or a directory of them (never the test "
                            "split; the bundled model's train split is offline/bundled/kjv_text/train.txt)")
    held_out: tuple[str, ...] = option((), "more held-out text files the data must not overlap (comma-separated; "
                                           "the bundled test split is always checked)")
    stage1: bool = option(True, "stage 1: layer-wise block-output matching (one decoder layer in memory)")
    stage2: bool = option(True, "stage 2: end-to-end KL(teacher || student) (both models in memory)")
    num_samples: int = option(128, "training windows drawn from the data")
    eval_samples: int = option(16, "probe windows (another seeded draw) for the before/after numbers")
    seq_len: int = option(256, "tokens per window")
    batch_size: int = option(8, "windows per forward batch (stage 2: per optimiser step)")
    stage1_steps: int = option(300, "Adam steps per decomposed layer in stage 1")
    stage1_lr: float = option(1e-2, "stage 1 step size, relative to each tensor's RMS (cosine-decayed)")
    stage1_batch_tokens: int = option(2048, "tokens per stage-1 step")
    stage1_inputs: str = option("teacher", "stage 1 passes on the dense layer's outputs ('teacher') or the "
                                "recovered layer's ('student', as compression's propagate=compressed)",
                                choices=STAGE1_INPUTS)
    stage2_steps: int = option(300, "Adam steps of stage 2")
    stage2_lr: float = option(3e-3, "stage 2 step size, relative to each tensor's RMS (cosine-decayed)")
    train_routers: bool = option(False, "also train the routers of the decomposed layers")
    seed: int = option(0, "seed of the window draw, batch order and everything random")
    device: str = option("auto", "where to train: auto (cuda when present), cpu, cuda", choices=DEVICES)
    dtype: str = option("float32", "training dtype (the output keeps each tensor's stored dtype)",
                        choices=DTYPES)
    force: bool = option(False, "replace an existing output directory")

    def __post_init__(self) -> None:
        if not (self.stage1 or self.stage2):
            raise RecoveryOptionsError("both stages are switched off: nothing to do (drop --no-stage1 or "
                                       "--no-stage2)")
        for name in ("num_samples", "seq_len", "batch_size", "stage1_batch_tokens"):
            if getattr(self, name) < 1:
                raise RecoveryOptionsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_samples", "stage1_steps", "stage2_steps"):
            if getattr(self, name) < 0:
                raise RecoveryOptionsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise RecoveryOptionsError(f"{name} must be positive, got {getattr(self, name)}")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("stage1_inputs", STAGE1_INPUTS)):
            if getattr(self, name) not in allowed:
                raise RecoveryOptionsError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.seq_len < 2:
            raise RecoveryOptionsError(f"seq_len must be >= 2 (next-token targets), got {self.seq_len}")

    def recorded(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("force")
        out["held_out"] = list(out["held_out"])
        return out

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RecoveryOptionsError("--device cuda: no CUDA device is available here; use --device auto or cpu")
        return torch.device(self.device)


def _held_out_files(options: RecoveryOptions) -> tuple[Path, ...]:
    files = [bundled_test_split()] + [Path(p) for p in options.held_out]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise RecoveryOptionsError(f"held-out file(s) {missing} do not exist")
    return tuple(dict.fromkeys(p.resolve() for p in files))


def recover(compressed_dir: str | os.PathLike, out_dir: str | os.PathLike, options: RecoveryOptions) -> Path:
    """Distil `compressed_dir` toward `options.teacher` into a new checkpoint at `out_dir`."""
    from moesvd_vllm.format.writer import CompressedCheckpointWriter
    from offline.recover_params import CompressedSource
    from offline.recover_stage2 import check_stage2_memory

    started = time.perf_counter()
    torch.manual_seed(options.seed)
    inputs = check_inputs(compressed_dir, options.teacher, out_dir, options.force)
    student = CompressedSource(inputs.compressed, inputs.block, inputs.dims)
    data = load_distillation_data(options.data, inputs.tokenizer_dir, num_samples=options.num_samples,
                                  eval_samples=options.eval_samples, seq_len=options.seq_len,
                                  batch_size=options.batch_size, seed=options.seed,
                                  held_out=_held_out_files(options))
    if options.stage2:
        check_stage2_memory(inputs.teacher, inputs.teacher_config, inputs.block, inputs.trainable_params,
                            _stage2_settings(options), options.seq_len)
    with CompressedCheckpointWriter(inputs.original_config, out_dir, replace=options.force) as writer:
        output = _Output(writer, student)
        report = _train(inputs, student, data, options, output)
        report["seconds"] = time.perf_counter() - started
        report["cpu_seconds"] = _cpu_seconds()
        report["peak_rss_bytes"] = _peak_rss_bytes()
        output.copy_the_rest()
        record = {**options.recorded(), "teacher": str(inputs.teacher), "data_sha256": data.sha256,
                  "data_tokens": data.stream_tokens, "summary": _summary(report)}
        previous = list(inputs.block.options.get(RECORD_KEY) or [])
        block = writer.finish(method=inputs.block.method, layers=inputs.block.layers,
                              options={**inputs.block.options, RECORD_KEY: previous + [record]},
                              calibration=inputs.block.calibration, side_files_from=inputs.compressed)
        (writer.directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (%s, %d decomposed layers recovered) in %.1f s", out_dir, block.method,
                len(block.decomposed_layers), report["seconds"])
    return Path(out_dir)


def _stage2_settings(options: RecoveryOptions):
    from offline.recover_stage2 import Stage2Settings

    return Stage2Settings(options.stage2_steps, options.stage2_lr, options.batch_size, options.train_routers,
                          options.seed, getattr(torch, options.dtype), options.torch_device())


class _Output:
    """The output checkpoint's tensors: trained ones (each in its stored dtype) as they are final, then
    every other tensor of the compressed checkpoint copied."""

    def __init__(self, writer, student) -> None:
        self.writer, self.student = writer, student
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor, stage: str) -> None:
        self.writer.add(name, tensor.to(getattr(torch, self.student.tensors.dtype(name))), stage=stage)
        self.written.add(name)

    def copy_the_rest(self) -> None:
        from moesvd_vllm.format.writer import COPIED

        for name in self.student.tensors.names():
            if name not in self.written:
                self.writer.add(name, self.student.tensors.get(name), stage=COPIED)


def _train(inputs, student, data, options: RecoveryOptions, output: _Output) -> dict[str, Any]:
    """Stage 1 and/or stage 2; the trained tensors go to `output` (at once per layer when stage 1 runs
    alone; after stage 2 otherwise, which needs stage 1's tensors in memory)."""
    from offline.layerwise import LayerwiseModel
    from offline.recover_stage1 import Stage1Settings, run_stage1
    from offline.recover_stage2 import run_stage2

    device, dtype = options.torch_device(), getattr(torch, options.dtype)
    report: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    trained: dict[str, torch.Tensor] = {}
    if options.stage1:
        settings = Stage1Settings(options.stage1_steps, options.stage1_lr, options.stage1_batch_tokens,
                                  options.batch_size, options.train_routers, options.stage1_inputs, options.seed,
                                  dtype, device)

        def spill(name: str, tensor: torch.Tensor) -> None:
            output.add(name, tensor, "stage 1 (layer-wise recovery)")

        clock = time.perf_counter()
        layers = run_stage1(LayerwiseModel(inputs.teacher, compute_dtype=dtype), student, data.train, data.eval,
                            settings, trained.__setitem__ if options.stage2 else spill)
        report["stage1"] = {"seconds": time.perf_counter() - clock, "layers": [dataclasses.asdict(r) for r in layers]}
    if options.stage2:
        result, trained = run_stage2(inputs.teacher, inputs.compressed, inputs.block, student.model_type, trained,
                                     data.train, data.eval, _stage2_settings(options))
        report["stage2"] = dataclasses.asdict(result)
        for name, tensor in trained.items():
            output.add(name, tensor, "stage 2 (end-to-end recovery)")
    return report


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    """CPU time of this process (wall time on a shared machine says little about the work)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": round(report["seconds"], 2)}
    if "stage1" in report:
        layers = report["stage1"]["layers"]
        out["stage1_block_error"] = {str(r["layer"]): [round(r["error_before"], 6), round(r["error_after"], 6)]
                                     for r in layers}
    if "stage2" in report:
        out["stage2_kl"] = [round(report["stage2"]["kl_before"], 6), round(report["stage2"]["kl_after"], 6)]
    return out


# ------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("compressed_dir", metavar="COMPRESSED", help="checkpoint written by `moesvd compress`")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    add_option_arguments(parser, RecoveryOptions)


def run(args: argparse.Namespace) -> int:
    from moesvd_vllm.format.directories import OutputExistsError

    try:
        out = recover(args.compressed_dir, args.out, from_arguments(RecoveryOptions, args))
    except (MoESVDError, CheckpointError, OutputExistsError, FileNotFoundError) as error:
        logger.error("%s", error)
        print(f"moesvd recover: error: {error}")
        return 1
    report = json.loads((Path(out) / REPORT_FILE).read_text(encoding="utf-8"))
    print(f"wrote {out}: {json.dumps(_summary(report))}; see {out}/{REPORT_FILE}")
    return 0
