"""Evidence for docs/results.md: held-out perplexity of every method at 20/40/60 % on the bundled model.

    python -m offline.results_bundled --work /tmp/moesvd-results --out docs/results.json

For each requested ratio the default method ("moe-svd-stacked") runs first; its ranks are multiples of
32, so on a small model the achievable ratios are coarse and the run takes the nearest reachable one.
Every other method then targets the ratio the default achieved, so all compare at (nearly) the same
routed-expert parameter count; each row records its own achieved ratio. Perplexity is measured with
`offline.eval_ppl.evaluate_perplexity` (the PyTorch reference) on the test split, never seen in training
or calibration (calibration uses the train split).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# (label, method, extra options)
VARIANTS: list[tuple[str, str, dict]] = [
    ("moe-svd-stacked (ours, default)", "moe-svd-stacked", {}),
    ("moe-svd-stacked, rank only (ablation: no neuron selection)", "moe-svd-stacked",
     {"min_intermediate_fraction": 1.0}),
    ("moe-svd-stacked, neuron selection only (ablation: no rank reduction)", "moe-svd-stacked",
     {"min_intermediate_fraction": 0.125}),
    ("moe-svd (paper: top-expert basis + U-trimming)", "moe-svd", {}),
    ("moe-svd, top-expert basis, no trimming (ablation)", "moe-svd", {"trim_keep": 8}),
    ("svd (plain, per expert, all layers)", "svd", {}),
    ("whitened-svd (SVD-LLM style, per expert, all layers)", "whitened-svd", {}),
]
REFERENCE = VARIANTS[0]  # runs first at each ratio; every other variant targets the ratio it achieved


STAGES = ("calibration data", "sensitivity pass", "plan", "decomposition pass", "write")


def _compress(model_dir: Path, out: Path, method: str, ratio: float, calib: str, extra: dict,
              calib_shape: tuple[int, int]) -> tuple[Path, float]:
    from offline.compress import CompressionOptions, compress
    from offline.sensitivity import RatioError

    shutil.rmtree(out, ignore_errors=True)
    last_error = None
    for tolerance in (0.01, 0.025, 0.05):
        options = CompressionOptions(ratio=ratio, calib=calib, method=method, num_samples=calib_shape[0],
                                     seq_len=calib_shape[1], ratio_tolerance=tolerance, force=True, **extra)
        try:
            compress(model_dir, out, options)
            break
        except RatioError as exc:
            last_error = exc
            logger.warning("%s at %.3f not reachable within %.3f; retrying wider", method, ratio, tolerance)
    else:
        raise last_error
    from moesvd_vllm.format.schema import read_moe_svd_config

    return out, read_moe_svd_config(out).params.ratio


def _stages(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())["stages"]


def run_all(model_dir: Path, work: Path, ratios: list[float], calib: str, test_text: str, seq_len: int,
            calib_shape: tuple[int, int]) -> dict:
    from offline.eval_ppl import evaluate_perplexity

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dense = evaluate_perplexity(model_dir, test_text, seq_len=seq_len)
    rows = [{"label": "dense", "method": "dense", "requested_ratio": 0.0, "achieved_ratio": 0.0,
             "ppl": dense.ppl, "tokens": dense.tokens}]
    logger.info("dense ppl %.3f on %d tokens", dense.ppl, dense.tokens)
    for ratio in ratios:
        target = ratio
        for variant in VARIANTS:
            label, method, extra = variant
            out = work / f"{method}-{'-'.join(f'{k}{v}' for k, v in extra.items())}-{int(ratio * 100)}"
            try:
                out, achieved = _compress(model_dir, out, method, target, calib, extra, calib_shape)
            except ValueError as exc:
                rows.append({"label": label, "method": method, "requested_ratio": ratio, "error": str(exc)})
                logger.error("%s at %.2f failed: %s", label, ratio, exc)
                continue
            if variant is REFERENCE:
                target = achieved  # everyone else matches the default's parameter count
            result = evaluate_perplexity(out, test_text, seq_len=seq_len)
            block = json.loads((out / "config.json").read_text())["moe_svd"]
            rows.append({"label": label, "method": method, "requested_ratio": ratio,
                         "achieved_ratio": achieved, "ppl": result.ppl, "tokens": result.tokens,
                         "expert_params": block["params"]["expert_compressed"],
                         "ranks": {k: v["rank"] for k, v in block["layers"].items()},
                         "neurons": {k: v.get("intermediate") for k, v in block["layers"].items()},
                         "banks": {k: max(v["bank_map"]) + 1 for k, v in block["layers"].items()},
                         "stages": _stages(out)})
            logger.info("%s @ %.3f: ppl %.3f", label, achieved, result.ppl)
            shutil.rmtree(out, ignore_errors=True)
    return {"model_dir": str(model_dir), "calibration": {"source": calib, "num_samples": calib_shape[0],
                                                          "seq_len": calib_shape[1]},
            "eval_seq_len": seq_len, "threads": torch.get_num_threads(),
            "wall_seconds": time.perf_counter() - started, "rows": rows}


def render_table(results: dict) -> str:
    """Markdown table: one row per method, one column per requested ratio (achieved ratio and ppl)."""
    rows = results["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    ratios = sorted({r["requested_ratio"] for r in rows if r["method"] != "dense"})
    labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"))
    head = "| method | " + " | ".join(f"~{int(q * 100)} %: removed / ppl" for q in ratios) + " |"
    lines = [f"Dense perplexity: **{dense['ppl']:.3f}** ({dense['tokens']} test tokens).", "", head,
             "|---|" + "---|" * len(ratios)]
    for label in labels:
        cells = []
        for q in ratios:
            row = next((r for r in rows if r["label"] == label and r["requested_ratio"] == q), None)
            if row is None or "ppl" not in row:
                cells.append("error" if row else "-")
            else:
                cells.append(f"{row['achieved_ratio'] * 100:.1f} % / {row['ppl']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Compression cost per stage (seconds / peak RSS MiB):", "",
              "| method | ratio | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for row in rows:
        if "stages" not in row:
            continue
        by_name = {st["name"]: st for st in row["stages"]}
        cells = [f"{by_name[n]['seconds']:.1f} / {by_name[n]['peak_rss_bytes'] / 2**20:.0f}" if n in by_name
                 else "-" for n in STAGES]
        lines.append(f"| {row['label']} | {row['achieved_ratio'] * 100:.1f} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from offline.bundled import bundled_model_dir, corpus_split_path, read_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model_dir = args.model or bundled_model_dir()
    results = run_all(model_dir, args.work, args.ratios, str(corpus_split_path("train")), read_split("test"),
                      args.eval_seq_len, (args.calib_samples, args.calib_seq_len))
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render_table(results), encoding="utf-8")
    for row in results["rows"]:
        print(f"{row['label']:55s} {row.get('achieved_ratio', float('nan')):.3f} "
              f"{row.get('ppl', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
