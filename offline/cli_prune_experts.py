"""`moesvd prune-experts MODEL_DIR --out OUT --ratio R --saliency reap|frequency --calib DATA [options]`:
the expert-pruning baseline (offline/expert_pruning.py), a normal checkpoint with fewer experts that stock
vLLM serves. The flags are generated from `ExpertPruningOptions`."""

from __future__ import annotations

import argparse
import logging

from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from offline.expert_pruning import ExpertPruningOptions

    parser.add_argument("model_dir", help="dense Hugging Face MoE checkpoint directory (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    add_option_arguments(parser, ExpertPruningOptions)


def run(args: argparse.Namespace) -> int:
    from moesvd_vllm.errors import MoESVDError
    from moesvd_vllm.format.directories import OutputExistsError
    from offline.expert_pruning import ExpertPruningOptions, prune_experts

    try:
        report = prune_experts(args.model_dir, args.out, from_arguments(ExpertPruningOptions, args))
    except (MoESVDError, OutputExistsError, FileNotFoundError) as exc:  # bad input: the message says the fix
        logger.error("%s", exc)
        print(f"moesvd prune-experts: error: {exc}")
        return 1
    print(f"wrote {args.out}: {report['experts_per_layer']} of {report['num_experts']} experts per MoE layer "
          f"kept ({report['saliency']} saliency), removed {report['achieved_ratio']:.1%} of routed-expert "
          f"parameters; stock vLLM serves it (`vllm serve {args.out}`)")
    return 0
