"""`moesvd compress MODEL_DIR --out OUT --ratio R --calib DATA [options]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging

logger = logging.getLogger(__name__)

# option name -> (help, argparse type); booleans are flags. Defaults come from CompressionOptions.
_HELP = {
    "method": "moe-svd-stacked (default, servable), moe-svd (paper), svd, whitened-svd (baselines)",
    "num_samples": "calibration windows (paper: 256)",
    "seq_len": "tokens per calibration window (paper: 2048)",
    "seed": "seed of the calibration sampling",
    "batch_size": "calibration windows per forward batch",
    "propagate": "outputs passed to the next layer: 'compressed' (sequential) or 'dense'",
    "selection": "'sensitivity' (selective decomposition, Eq. 4) or 'all' layers; default by method",
    "outlier_tau": "tau of the activation-outlier ratio (Eq. 10)",
    "rank_threshold": "principal rank: singular values above this times the largest",
    "min_kept_fraction": "plan: decompose few layers only while each keeps >= this share of its parameters",
    "min_intermediate_fraction": "keep >= this share of each expert's neurons, then lower the rank (1: rank only)",
    "intermediate_step": "kept neurons per expert in steps of this (32: no padding in vLLM's x86 kernel; min 8)",
    "ratio_tolerance": "allowed |achieved - requested| ratio",
    "basis_dtype": "dtype of the shared bases: auto (the model's), float32 (AVX2-only CPUs), bfloat16, float16",
    "routing_weighted": "weight each routed token's Gram contribution by its routing weight squared",
    "output_basis": "moe-svd-stacked output basis: 'block' (PCA of the MoE output) or 'experts'",
    "trim_keep": "U-trimming: experts kept per group (moe-svd default 2; default off otherwise)",
    "trim_group_size": "U-trimming group size",
    "prior_tokens": "weight of the layer-average Gram added to each expert's Gram (in tokens)",
    "damp": "relative diagonal damping of per-expert Grams",
    "baseline_rank_step": "rank granularity of the per-expert baselines",
    "max_shard_bytes": "largest output shard in bytes",
}


def _arg_type(annotation: str):
    """"int | None" -> int (the dataclass annotations are strings)."""
    return {"int": int, "float": float, "str": str}[str(annotation).split("|")[0].strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offline.compress import CompressionOptions

    parser.add_argument("model_dir", help="Hugging Face MoE checkpoint directory (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of routed-expert parameters to remove, in (0, 1), e.g. 0.4")
    parser.add_argument("--calib", required=True,
                        help="calibration text: a .txt/.jsonl file, a directory of them, or a datasets name")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    for field in dataclasses.fields(CompressionOptions):
        if field.name in ("ratio", "calib", "force"):
            continue
        flag = "--" + field.name.replace("_", "-")
        help_ = f"{_HELP.get(field.name, '')} (default: {field.default})"
        if str(field.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_)
        else:
            parser.add_argument(flag, type=_arg_type(field.type), default=field.default, help=help_)


def run(args: argparse.Namespace) -> int:
    from offline.calibration import CalibrationError
    from offline.checkpoint_io import CheckpointError, OutputExistsError
    from offline.compress import CompressionOptions, OptionsError, compress
    from offline.decompose import WhiteningError
    from offline.sensitivity import RatioError
    from moesvd_vllm.format.schema import SchemaError

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompressionOptions)}
    try:
        options = CompressionOptions.from_dict(values)
        out = compress(args.model_dir, args.out, options)
    except (CalibrationError, CheckpointError, OutputExistsError, OptionsError, RatioError, SchemaError,
            WhiteningError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        print(f"moesvd compress: error: {exc}")
        return 1
    from moesvd_vllm.format.schema import read_moe_svd_config

    block = read_moe_svd_config(out)
    print(f"wrote {out}: method {block.method}, removed {block.params.ratio:.1%} of routed-expert "
          f"parameters, decomposed layers {block.decomposed_layers}; see {out}/report.md")
    return 0
