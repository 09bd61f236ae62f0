"""Compression at scale: `--device`, torch.distributed under torchrun (gloo, 2 CPU processes) and `--resume`
after a SIGKILL (offline/devices.py, offline/distributed.py, offline/journal.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moesvd_vllm.format.directories import read_config
from offline.compress import CompressionOptions, compress
from offline.devices import DeviceError, resolve_device
from offline.expert_tensors import CheckpointTensors

REPO = Path(__file__).resolve().parent.parent
CALIB = REPO / "offline" / "bundled" / "kjv_text" / "validation.txt"
BUNDLED = REPO / "offline" / "bundled" / "moe_mini"
# The issue asks for 1e-4 relative between 1 and N processes; with the same threads per process the
# checkpoints are equal bit for bit: every float32 GEMM sees the same batch as in one process, the
# layer-wide float64 sums are exact until read (offline/exact_sum.py) and an expert's Grams are formed from
# every rank's rows in batch order. Before that, the float64 sums' order alone moved a tensor of the
# bundled model's default checkpoint by 4.3e-7 and a Qwen3-30B-A3B-shaped bf16 layer's by 1.5e-3.


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = CheckpointTensors(directory)
    return {name: tensors.get(name) for name in tensors.names()}


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x, y), (name, float((x.double() - y.double()).norm() / x.double().norm()))
    assert read_config(a)["moe_svd"] == read_config(b)["moe_svd"]


def _cli(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moesvd_vllm.cli", "compress", str(model), "--out", str(out), "--ratio", "0.3",
            "--calib", str(CALIB), "--intermediate-step", "8", "--device", "cpu", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------ devices
def test_cuda_without_cuda_is_a_clear_error_and_nothing_is_written(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():  # a GPU machine: `cuda` is this process's GPU
        assert resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(DeviceError, match=r"--device cuda asks for a CUDA GPU.*--device cpu"):
        compress(tiny_model_dir("qwen3_moe"), tmp_path / "out",
                 CompressionOptions(ratio=0.3, calib=str(CALIB), device="cuda"))
    assert list(tmp_path.iterdir()) == []
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0"])
def test_malformed_device_is_refused_with_the_choices(spec):
    with pytest.raises(DeviceError, match="auto .* cpu, cuda or cuda:N"):
        CompressionOptions(ratio=0.3, calib="x", device=spec)


# ------------------------------------------------------------------------------------------ torch.distributed
@pytest.mark.parametrize("which", ["tiny-default", "bundled-moe-svd",
                                   pytest.param("tiny-down-fit", marks=pytest.mark.slow)])
def test_two_processes_give_the_checkpoint_of_one(tiny_model_dir, tmp_path, which):
    """torchrun with 2 gloo processes: calibration windows split, statistics summed, experts (neuron
    selection and fits for the default, U-trimming groups for moe-svd) split; rank 0 writes. `--down-fit
    outputs` gathers each expert's routed rows on the rank that fits it."""
    model = BUNDLED if which == "bundled-moe-svd" else tiny_model_dir("qwen3_moe")
    # tiny: with expert-skipping calibration too (its betas come from every rank's routing ratios)
    method = {"bundled-moe-svd": ["--method", "moe-svd", "--ratio", "0.4"],
              "tiny-default": ["--skip-target", "0.3"],
              "tiny-down-fit": ["--ratio", "0.6", "--down-fit", "outputs"]}[which]  # 0.6: layers with bases
    small = ["--num-samples", "8", "--seq-len", "32", "--batch-size", "2"]  # 4 batches: 2 per rank
    one = subprocess.run(_cli(model, tmp_path / "one", *small, *method), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "moesvd_vllm.cli"]
    two = subprocess.run(torchrun + _cli(model, tmp_path / "two", *small, *method)[3:], env=_env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "report.json").read_text())["summary"]
    assert summary["world_size"] == 2
    assert json.loads((tmp_path / "one" / "report.json").read_text())["summary"]["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no journal, no partial left


def test_a_rank_without_calibration_windows_gives_the_checkpoint_of_one(tmp_path):
    """One calibration batch for two processes: rank 1 routes no rows, and its empty tensors must meet
    rank 0's bf16 rows in the same collectives (the bf16 bundled model, so the dtypes differ)."""
    model = REPO / "offline" / "bundled" / "moe_fine"
    one_batch = ["--num-samples", "2", "--seq-len", "32", "--batch-size", "2"]
    one = subprocess.run(_cli(model, tmp_path / "one", *one_batch), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "moesvd_vllm.cli"]
    two = subprocess.run(torchrun + _cli(model, tmp_path / "two", *one_batch)[3:], env=_env(),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_nodes_on_loopback_give_the_checkpoint_of_one(tiny_model_dir, tmp_path):
    """Two torchrun "nodes" of one process each on this machine (static rendezvous on 127.0.0.1), as two
    machines would run it: `--nnodes 2 --node-rank {0,1} --master-addr ... --master-port ...`."""
    model = tiny_model_dir("qwen3_moe")
    small = ["--num-samples", "8", "--seq-len", "32", "--batch-size", "2"]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "moesvd_vllm.cli",
         *_cli(model, tmp_path / "two", *small)[3:]],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    one = subprocess.run(_cli(model, tmp_path / "one", *small), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    _assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "report.json").read_text())["summary"]["world_size"] == 2


# ------------------------------------------------------------------------------------------ resume
def _kill_once_journaled(cmd: list[str], journal: Path, kind: str) -> None:
    """Run `cmd` and SIGKILL it as soon as its journal holds a finished layer of the pass `kind`."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (journal.exists() and f'"kind":"{kind}"' in journal.read_text()):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no layer was journaled"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.slow  # ~100 s; SIGINT / SIGTERM resumes are in the default set (tests/test_compress.py)
def test_sigkill_then_resume_gives_the_uninterrupted_checkpoint(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen3_moe"), model)
    work = tmp_path / "work"
    work.mkdir()
    # small shards: shards are completed (and spill files replaced) in the middle of layers
    args = ["--num-samples", "32", "--seq-len", "64", "--batch-size", "4", "--max-shard-bytes", "300000"]
    cmd = _cli(model, work / "out", *args)
    journal = work / ".out.journal" / "journal.jsonl"
    _kill_once_journaled(cmd, journal, "sensitivity")  # in the sensitivity pass
    _kill_once_journaled(cmd + ["--resume"], journal, "decomposition")  # resumed, then killed again
    left = sorted(p.name for p in work.iterdir())
    assert left == [".out.journal", ".out.partial"]  # hidden: nothing looks like a finished checkpoint
    assert not list((work / ".out.partial").glob("*.json")) and not list((work / ".out.partial").glob("model-*"))

    def refused(extra: list[str], *matches: str) -> None:
        run = subprocess.run(cmd + extra, env=_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and all(m in run.stdout for m in matches), run.stdout[-2000:] + run.stderr[-2000:]

    refused([], "continue it with --resume, or start over with --force")
    refused(["--resume", "--ratio", "0.35"], "--resume refused", "options.ratio (0.3 then, 0.35 now)")
    os.utime(model / "config.json")  # a changed input
    refused(["--resume"], "input.config.json")
    os.utime(model / "config.json", ns=(0, json.loads(journal.read_text().splitlines()[0])["input"]
                                        ["config.json"]["mtime_ns"]))
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    report = json.loads((work / "out" / "report.json").read_text())["summary"]
    assert report["resumed_at_layer"] >= 1
    reference = subprocess.run(_cli(model, work / "reference", *args), env=_env(), capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    _assert_same_checkpoint(work / "reference", work / "out")
    assert len(list((work / "out").glob("model-*.safetensors"))) > 1
