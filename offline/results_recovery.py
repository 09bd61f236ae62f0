"""Evidence for docs/results.md: perplexity before and after recovery (`moesvd recover`) on the bundled model.

    python -m offline.results_recovery --work /tmp/moesvd-recovery --out /tmp/moesvd-recovery/recovery.json

For each method, ratio and calibration seed: compress (`moesvd compress`, calibration windows drawn from
the train split with that seed), recover stage 1 (layer-wise block matching) into one checkpoint, then
stage 2 (end-to-end KL) from the stage-1 checkpoint into another, with the committed recovery defaults
and the same seed for the distillation windows (train split). Every checkpoint is scored with the PyTorch
reference on the validation split (where settings are chosen) and on the test split (reported once, with
the committed defaults). The gap closed is (ppl_zero_shot - ppl_recovered) / (ppl_zero_shot - ppl_dense). The table gives
the mean over seeds and, across seeds, [min-max].
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from statistics import mean

import torch

logger = logging.getLogger(__name__)

METHODS = ("moe-svd-stacked", "moe-svd", "shared-core")
ARMS = ("zero-shot", "stage 1", "stage 1 + 2")
SPLITS = ("validation", "test")


def _compress(model_dir: Path, out: Path, method: str, ratio: float, seed: int, calib: str) -> float:
    from moesvd_vllm.format.schema import read_moe_svd_config
    from offline.compress import CompressionOptions, compress

    compress(model_dir, out, CompressionOptions(ratio=ratio, calib=calib, method=method, seed=seed,
                                                num_samples=64, seq_len=128, ratio_tolerance=0.025,
                                                force=True))
    return read_moe_svd_config(out).params.ratio


def _recover(source: Path, out: Path, teacher: Path, data: str, seed: int, stage: int) -> dict:
    from offline.recover import REPORT_FILE, RecoveryOptions, recover

    options = RecoveryOptions(teacher=str(teacher), data=data, seed=seed, force=True,
                              stage1=stage == 1, stage2=stage == 2)
    started, cpu = time.perf_counter(), time.process_time()
    recover(source, out, options)
    report = json.loads((out / REPORT_FILE).read_text())
    # peak RSS is the process's so far (this script runs every cell in one process)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            "process_peak_rss_bytes": report["peak_rss_bytes"]}


def run_cell(model_dir: Path, work: Path, method: str, ratio: float, seed: int, calib: str,
             eval_texts: dict[str, str], seq_len: int) -> dict:
    from offline.eval_ppl import evaluate_perplexity

    base = work / f"{method}-{int(ratio * 100)}-s{seed}"
    zero, stage1, stage2 = (base.with_name(base.name + s) for s in ("-zero", "-r1", "-r2"))
    achieved = _compress(model_dir, zero, method, ratio, seed, calib)
    cost = {"stage 1": _recover(zero, stage1, model_dir, calib, seed, stage=1)}
    cost["stage 2"] = _recover(stage1, stage2, model_dir, calib, seed, stage=2)
    ppl = {split: {arm: evaluate_perplexity(path, text, seq_len=seq_len).ppl
                   for arm, path in zip(ARMS, (zero, stage1, stage2))} for split, text in eval_texts.items()}
    logger.info("%s %.0f %% seed %d: %s", method, ratio * 100, seed,
                ", ".join(f"{a} {p:.3f}" for a, p in ppl["test"].items()))
    for path in (zero, stage1, stage2):
        shutil.rmtree(path, ignore_errors=True)
    return {"method": method, "ratio": ratio, "seed": seed, "achieved_ratio": achieved, "ppl": ppl,
            "cost": cost}


def _cells_from(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"] if path.exists() else []


def run_all(model_dir: Path, work: Path, out: Path, methods, ratios, seeds, seq_len: int) -> dict:
    from offline.bundled import corpus_split_path, read_split
    from offline.eval_ppl import evaluate_perplexity

    work.mkdir(parents=True, exist_ok=True)
    calib = str(corpus_split_path("train"))
    texts = {split: read_split(split) for split in SPLITS}
    results = {"eval_seq_len": seq_len, "threads": torch.get_num_threads(),
               "dense_ppl": {s: evaluate_perplexity(model_dir, t, seq_len=seq_len).ppl for s, t in texts.items()},
               "cells": _cells_from(out)}  # a rerun continues where the last one stopped
    done = {(c["method"], c["ratio"], c["seed"]) for c in results["cells"]}
    for method in methods:
        for ratio in ratios:
            for seed in seeds:
                if (method, ratio, seed) in done:
                    continue
                results["cells"].append(run_cell(model_dir, work, method, ratio, seed, calib, texts, seq_len))
                out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _spread(values: list[float], digits: int = 2) -> str:
    """Mean and, over several seeds, [min-max]."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def render_table(results: dict, split: str = "test") -> str:
    dense = results["dense_ppl"][split]
    lines = [f"Dense perplexity ({split} split): **{dense:.3f}**.", "",
             "| method | removed | seeds | zero-shot ppl | after stage 1 | after stage 1 + 2 | gap closed (1 + 2) "
             "| recovery seconds (1 / 2) |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for cell in results["cells"]:
        groups.setdefault((cell["method"], cell["ratio"]), []).append(cell)
    for (method, ratio), cells in groups.items():
        ppl = {arm: [c["ppl"][split][arm] for c in cells] for arm in ARMS}
        closed = [(c["ppl"][split]["zero-shot"] - c["ppl"][split]["stage 1 + 2"])
                  / (c["ppl"][split]["zero-shot"] - dense) for c in cells]
        seconds = [f"{mean(c['cost'][s]['seconds'] for c in cells):.0f}" for s in ("stage 1", "stage 2")]
        removed = mean(c["achieved_ratio"] for c in cells) * 100
        lines.append(f"| {method} | {removed:.1f} % | {len(cells)} | {_spread(ppl['zero-shot'])} | "
                     f"{_spread(ppl['stage 1'])} | {_spread(ppl['stage 1 + 2'])} | "
                     f"{_spread([100 * x for x in closed], 0)} % | {' / '.join(seconds)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from offline.bundled import bundled_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file (a rerun continues it)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=SPLITS, default="test", help="the split the table shows")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    results = run_all(args.model or bundled_model_dir(), args.work, args.out, args.methods, args.ratios,
                      args.seeds, args.eval_seq_len)
    table = render_table(results, args.split)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
