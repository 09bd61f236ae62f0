"""The results protocol: every method at every ratio on both bundled models, several calibration seeds,
in-domain and out-of-domain, validation for choosing, test reported once.

    python -m offline.results_protocol --work /tmp/moesvd-protocol            # the whole grid (hours)
    python -m offline.results_protocol --models moe_fine --ratios 0.4 0.6 --render-only

One command regenerates docs/results-protocol.json and the protocol section of docs/results.md.
For each model, ratio and calibration seed the default method runs first; every other variant targets
the routed-expert ratio the default achieved (same parameter count; each cell records its own). Each
checkpoint is scored with the PyTorch reference (float32) on the validation and test windows of every
evaluation text: the calibration domain's own split and texts of other domains (offline/bundled/sources.py;
the Devil's Dictionary was never trained on). Per window: NLL, KL(dense || compressed), top-1 agreement
(offline/protocol_scores.py); intervals are paired bootstrap intervals over windows (protocol_report.py).
Cells are appended to the JSON as they finish, so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offline.bundled.evaluate import split_windows, token_stream
from offline.bundled.sources import read_source_documents, source_dir
from offline.protocol_scores import next_token_logprobs, score_windows
from offline.sensitivity import RatioError

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")
RATIOS = (0.2, 0.3, 0.4, 0.5, 0.6)
SEEDS = (0, 1, 2)
EVAL_SEQ_LEN = 256
EVAL_WINDOWS = 32  # per text and split (fewer where the text is shorter)
REPORTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "protocol-reports"  # seed 0's per-layer reports
CALIB_SAMPLES = 64  # calibration windows of 256 tokens, drawn from the calibration domain's train split


@dataclass(frozen=True)
class ProtocolModel:
    directory: str  # under offline/bundled/
    calib_source: str  # the domain users calibrate on; scored on its own test split ("in-domain")
    eval_sources: tuple[str, ...]  # every text scored (the calibration domain first)


MODELS = {
    "moe_mini": ProtocolModel("moe_mini", "kjv", ("kjv", "python-docs", "debian-reference", "devils-dictionary")),
    "moe_fine": ProtocolModel("moe_fine", "python-docs",
                              ("python-docs", "kjv", "debian-reference", "devils-dictionary")),
}


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "compress" (moesvd compress) | "prune-experts" (offline/expert_pruning.py)
    method: str = "moe-svd-stacked"  # compress: the method; prune-experts: the saliency
    extra: dict = field(default_factory=dict)
    servable: bool = True  # on vLLM's fused MoE kernels (plugin or stock); per-expert factors are not


VARIANTS = (
    Variant("default (neuron selection, then shared-basis rank)", "compress"),
    Variant("ours: shared-basis rank only", "compress", extra={"min_intermediate_fraction": 1.0}),
    Variant("ours: neuron selection only", "compress", extra={"min_intermediate_fraction": 0.125}),
    Variant("ours: default, output basis from the experts' down projections", "compress",
            extra={"output_basis": "experts"}),
    Variant("paper: V-sharing + U-trimming (Algorithm 3)", "compress", "moe-svd"),
    Variant("paper: V-sharing, no trimming", "compress", "moe-svd", {"trim_keep": 10**6}),
    # Eq. 8's sums are new matrices: stored (and served) as a bank per expert, at that parameter count
    Variant("paper: V-sharing + U-trimming (Eq. 8 sums)", "compress", "moe-svd", {"trim_combine": "sum"}),
    # group-wise bases (format version 4): "experts" = one group per expert (G = E), "trim groups" = the
    # U-trimming groups of 8 (App. D.4: DeepSeek's 64 experts in 8 groups, V shared within each)
    Variant("ours: per-expert bases, rank only", "compress",
            extra={"basis_groups": "experts", "min_intermediate_fraction": 1.0}),
    # the down factor fitted to the dense expert's output from the compressed gate/up (`--down-fit outputs`)
    Variant("ours: default, down factor fitted to outputs", "compress", extra={"down_fit": "outputs"}),
    Variant("ours: per-expert bases, down factor fitted to outputs", "compress",
            extra={"basis_groups": "experts", "min_intermediate_fraction": 1.0, "down_fit": "outputs"}),
    Variant("paper: group-wise V-sharing + U-trimming (App. D.4)", "compress", "moe-svd",
            {"basis_groups": "trim groups"}),
    Variant("per-expert SVD", "compress", "svd", servable=False),
    Variant("whitened SVD (SVD-LLM)", "compress", "whitened-svd", servable=False),
    Variant("magnitude neuron pruning", "compress", "magnitude-neurons"),
    Variant("expert pruning, REAP saliency", "prune-experts", "reap"),
    Variant("expert pruning, routing frequency", "prune-experts", "frequency"),
)
DEFAULT = VARIANTS[0]


def variant_named(label: str) -> Variant:
    for variant in VARIANTS:
        if variant.label == label:
            return variant
    raise ValueError(f"unknown variant {label!r}; expected one of {[v.label for v in VARIANTS]}")


def model_dir(name: str) -> Path:
    from offline.bundled import PACKAGE_DIR

    return PACKAGE_DIR / MODELS[name].directory


def calibration_file(source: str) -> Path:
    return source_dir(source) / "train.txt"


def eval_windows(tokenizer_dir: Path, sources: tuple[str, ...], per_text: int = EVAL_WINDOWS
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {source: [n, EVAL_SEQ_LEN] token windows}} from the start of each split's token stream."""
    from offline.bundled.evaluate import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    windows: dict[str, dict[str, torch.Tensor]] = {}
    for split in SPLITS:
        windows[split] = {}
        for source in sources:
            stream = token_stream(tokenizer, read_source_documents(source, split))
            windows[split][source] = split_windows(stream, EVAL_SEQ_LEN, per_text)
    return windows


def _model_options(extra: dict, model_path: Path) -> dict:
    """The variant's options for this model: `trim_keep` of a whole group means no trimming (clipped to the
    group size and the expert count); `basis_groups` "experts" is one group per expert, "trim groups" one
    per U-trimming group."""
    from offline.compression_options import CompressionOptions

    config = json.loads((model_path / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    group = min(CompressionOptions.__dataclass_fields__["trim_group_size"].default, experts)
    out = dict(extra)
    if "trim_keep" in out:
        out["trim_keep"] = min(out["trim_keep"], group)
    if "basis_groups" in out:
        out["basis_groups"] = {"experts": experts, "trim groups": experts // group}.get(out["basis_groups"],
                                                                                     out["basis_groups"])
    return out


def build_checkpoint(variant: Variant, source: Path, out: Path, ratio: float, seed: int, calib: Path,
                     samples: int = CALIB_SAMPLES) -> float:
    """Write the variant's checkpoint at `ratio`; returns the achieved routed-expert ratio."""
    shutil.rmtree(out, ignore_errors=True)
    if variant.kind == "prune-experts":
        from offline.expert_pruning import ExpertPruningOptions, prune_experts

        report = prune_experts(source, out, ExpertPruningOptions(ratio=ratio, saliency=variant.method,
                                                                 calib=str(calib), seed=seed, force=True,
                                                                 num_samples=samples))
        return report["achieved_ratio"]
    return _compress(variant, source, out, ratio, seed, calib, samples)


def _compress(variant: Variant, source: Path, out: Path, ratio: float, seed: int, calib: Path,
              samples: int) -> float:
    from moesvd_vllm.format.schema import read_moe_svd_config
    from offline.compress import CompressionOptions, compress

    last_error: Exception | None = None
    for tolerance in (0.01, 0.025, 0.05):
        options = CompressionOptions(ratio=ratio, calib=str(calib), method=variant.method, seed=seed,
                                     num_samples=samples, seq_len=256, ratio_tolerance=tolerance, force=True,
                                     **_model_options(variant.extra, source))
        try:
            compress(source, out, options)
            return read_moe_svd_config(out).params.ratio
        except RatioError as error:
            last_error = error
            logger.warning("%s at %.3f not reachable within %.3f; retrying wider", variant.label, ratio, tolerance)
    raise last_error


def _keep_layer_report(checkpoint: Path, stem: Path) -> None:
    """The per-layer report of a cell (compress: report.md; expert pruning: expert_pruning.json)."""
    for name in ("report.md", "expert_pruning.json"):
        if (checkpoint / name).is_file():
            stem.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(checkpoint / name, stem.with_name(f"{stem.name}.{name.split('.')[-1]}"))


class DenseReference:
    """The dense model's scores and next-token log-probabilities on every evaluation window (kept in memory)."""

    def __init__(self, path: Path, windows: dict[str, dict[str, torch.Tensor]]):
        from offline.reference import load_reference_model

        model = load_reference_model(path, dtype=torch.float32)
        self.logprobs = {split: {s: next_token_logprobs(model, w) for s, w in by.items()}
                         for split, by in windows.items()}
        self.scores = {split: {s: score_windows(model, w, None).as_dict() for s, w in by.items()}
                       for split, by in windows.items()}


def score_checkpoint(path: Path, windows, dense: DenseReference) -> dict:
    from offline.reference import load_reference_model

    model = load_reference_model(path, dtype=torch.float32)
    return {split: {source: score_windows(model, w, dense.logprobs[split][source]).as_dict()
                    for source, w in by.items()} for split, by in windows.items()}


def run_cell(name: str, variant: Variant, ratio: float, seed: int, target: float, work: Path,
             windows, dense: DenseReference, samples: int, reports: Path | None) -> dict:
    slug = re.sub(r"[^a-z0-9]+", "-", variant.label.lower()).strip("-")[:40]
    out = work / f"{name}-{slug}-{int(ratio * 100)}-s{seed}"
    started = time.perf_counter()
    try:
        achieved = build_checkpoint(variant, model_dir(name), out, target, seed,
                                    calibration_file(MODELS[name].calib_source), samples)
    except RatioError as error:  # the variant's steps cannot land near the default's count: say so
        logger.warning("%s | %s | %.0f %% seed %d: %s", name, variant.label, ratio * 100, seed, error)
        return {"model": name, "variant": variant.label, "ratio": ratio, "seed": seed, "unreachable": str(error)}
    scores = score_checkpoint(out, windows, dense)
    if reports is not None and seed == SEEDS[0]:
        _keep_layer_report(out, reports / name / f"{slug}-{int(ratio * 100)}")
    shutil.rmtree(out, ignore_errors=True)
    in_domain = scores["test"][MODELS[name].calib_source]["ppl"]
    logger.info("%s | %s | %.0f %% (achieved %.3f) seed %d: in-domain test ppl %.3f (%.0f s)", name,
                variant.label, ratio * 100, achieved, seed, in_domain, time.perf_counter() - started)
    return {"model": name, "variant": variant.label, "ratio": ratio, "seed": seed, "achieved_ratio": achieved,
            "seconds": round(time.perf_counter() - started, 1), "scores": scores}


def run_model(name: str, results: dict, out: Path, work: Path, variants, ratios, seeds,
              windows_per_text: int = EVAL_WINDOWS, calib_samples: int = CALIB_SAMPLES,
              reports: Path | None = None) -> None:
    path = model_dir(name)
    windows = eval_windows(path, MODELS[name].eval_sources, windows_per_text)
    dense = DenseReference(path, windows)
    entry = results["models"].setdefault(name, {"cells": []})
    entry.update(calib_samples=calib_samples, calib_seq_len=256, calib_source=MODELS[name].calib_source, eval_sources=list(MODELS[name].eval_sources),
                 dense=dense.scores)
    done = {(c["variant"], c["ratio"], c["seed"]): c for c in entry["cells"]}
    for ratio in ratios:
        for seed in seeds:
            for variant in (DEFAULT,) + tuple(v for v in variants if v != DEFAULT):
                key = (variant.label, ratio, seed)
                if key not in done:
                    target = ratio if variant == DEFAULT else done[(DEFAULT.label, ratio, seed)]["achieved_ratio"]
                    done[key] = run_cell(name, variant, ratio, seed, target, work, windows, dense, calib_samples,
                                         reports)
                    entry["cells"].append(done[key])
                    out.write_text(json.dumps(results) + "\n", encoding="utf-8")


def _same_dense_scores(a: dict, b: dict, rel: float = 1e-5) -> bool:
    """The dense model's per-window NLLs of two runs agree: the same windows, up to float32 summation order
    (another thread count moves a window's summed NLL by ~1e-7 relative; another window by far more)."""
    if a.keys() != b.keys() or any(a[split].keys() != b[split].keys() for split in a):
        return False
    pairs = [(x, y) for split in a for source in a[split]
             for x, y in zip(a[split][source]["nll"], b[split][source]["nll"], strict=True)]
    return all(abs(x - y) <= rel * max(abs(x), abs(y)) for x, y in pairs)


def merge_results(results: dict, other: dict) -> None:
    """Add `other`'s cells (a run of other ratios or seeds, same models and windows) to `results`."""
    for name, entry in other["models"].items():
        mine = results["models"].setdefault(name, {**entry, "cells": []})
        if not _same_dense_scores(mine["dense"], entry["dense"]):
            raise ValueError(f"{name}: the runs scored different evaluation windows; they cannot be merged")
        have = {(c["variant"], c["ratio"], c["seed"]) for c in mine["cells"]}
        mine["cells"] += [c for c in entry["cells"] if (c["variant"], c["ratio"], c["seed"]) not in have]


def main(argv: list[str] | None = None) -> int:
    from offline.protocol_report import DOC_PATH, JSON_PATH, write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moesvd-protocol"), help="scratch checkpoints")
    parser.add_argument("--out", type=Path, default=JSON_PATH, help="the results JSON (appended per cell)")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="the markdown report to regenerate")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--variants", nargs="+", default=None, help="labels (default: all of VARIANTS)")
    parser.add_argument("--reports", type=Path, default=REPORTS_DIR, help="where seed 0's per-layer reports go")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="evaluation windows per text and split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true", help="only rewrite --doc from --out")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="results JSONs of parallel runs (e.g. one per ratio) whose cells join --out first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"models": {}}
    for other in args.merge:
        merge_results(results, json.loads(other.read_text()))
    if args.merge:
        args.out.write_text(json.dumps(results) + "\n", encoding="utf-8")
    if not args.render_only:
        variants = VARIANTS if args.variants is None else tuple(variant_named(v) for v in args.variants)
        args.work.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            run_model(name, results, args.out, args.work, variants, args.ratios, args.seeds, args.windows,
                      reports=args.reports)
    write_report(results, args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
