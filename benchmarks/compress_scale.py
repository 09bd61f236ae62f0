"""Time `moesvd compress` with 1 and N processes (torchrun, gloo on the CPU / NCCL on GPUs) on the same model
and check that the checkpoints agree (docs/performance.md, "Compression at scale").

    python -m benchmarks.compress_scale MODEL_DIR --work /tmp/scale/bench --procs 1 2 -- --ratio 0.6 ...

Everything after `--` goes to `moesvd compress`. Runs are sequential (the machine is shared: repeat with
--repeats and read the spread); with several processes each gets OMP_NUM_THREADS = cores / processes.
Writes WORK/compress_scale.json: per run the wall time, the compressor's stage times (rank 0) and the
largest relative difference of every tensor to the 1-process checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from offline.expert_tensors import CheckpointTensors


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = CheckpointTensors(directory)
    return {name: tensors.get(name) for name in tensors.names()}


def largest_difference(reference: Path, other: Path) -> float:
    """max over tensors of ||a - b|| / ||a|| (float64)."""
    ta, tb = _tensors(reference), _tensors(other)
    if set(ta) != set(tb):
        raise AssertionError(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    worst = 0.0
    for name, a in ta.items():
        a, b = a.double(), tb[name].double()
        worst = max(worst, float((a - b).norm() / a.norm().clamp(min=1e-300)))
    return worst


def run_once(model: Path, out: Path, procs: int, compress_args: list[str], cores: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(cores // procs, 1)))
    cli = ["-m", "moesvd_vllm.cli", "compress", str(model), "--out", str(out), "--force", *compress_args]
    cmd = ([sys.executable, *cli] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *cli[0:2],
            *cli[2:]])
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"procs": procs, "threads_per_process": env["OMP_NUM_THREADS"], "wall_s": round(wall, 1),
            "stages_s": {s["name"]: round(s["seconds"], 1) for s in report["stages"]},
            "peak_rss_mib": {s["name"]: round(s["peak_rss_bytes"] / 2**20) for s in report["stages"]},
            "world_size": report["summary"]["world_size"], "load_before": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, compress_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(ours)
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        for procs in args.procs:
            out = args.work / f"out-{procs}"
            runs.append(dict(run_once(args.model_dir, out, procs, compress_args, args.cores), repeat=repeat))
            if procs != args.procs[0]:
                runs[-1]["largest_relative_difference"] = largest_difference(args.work / f"out-{args.procs[0]}", out)
                first = json.loads((args.work / f"out-{args.procs[0]}" / "config.json").read_text())["moe_svd"]
                runs[-1]["same_moe_svd_block"] = first == json.loads((out / "config.json").read_text())["moe_svd"]
            print(json.dumps(runs[-1]), flush=True)
    (args.work / "compress_scale.json").write_text(json.dumps({"compress_args": compress_args, "runs": runs},
                                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
