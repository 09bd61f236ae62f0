"""`moesvd compress MODEL_DIR --out OUT --ratio R --calib DATA [options]`: the flags are generated from
`CompressionOptions` (offline/compression_options.py), the `--method` choices from the method registry."""

from __future__ import annotations

import argparse
import logging

from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offline.compression_options import CompressionOptions

    parser.add_argument("model_dir", help="Hugging Face MoE checkpoint directory (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    add_option_arguments(parser, CompressionOptions)


def run(args: argparse.Namespace) -> int:
    from moesvd_vllm.errors import MoESVDError
    from moesvd_vllm.format.directories import OutputExistsError
    from moesvd_vllm.format.schema import read_moe_svd_config
    from offline.compress import CompressionOptions, compress

    try:
        options = from_arguments(CompressionOptions, args)
        out = compress(args.model_dir, args.out, options)
    except (MoESVDError, OutputExistsError, FileNotFoundError) as exc:  # bad input: the message says the fix
        logger.error("%s", exc)
        print(f"moesvd compress: error: {exc}")
        return 1
    block = read_moe_svd_config(out)
    print(f"wrote {out}: method {block.method}, removed {block.params.ratio:.1%} of routed-expert "
          f"parameters, decomposed layers {block.decomposed_layers}; see {out}/report.md")
    return 0
