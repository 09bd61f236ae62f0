"""`moesvd skip MODEL_DIR --out OUT --calib DATA (--skip-beta B | --skip-target F)`: a checkpoint that only
adds dynamic expert skipping to a dense model (no MoE layer decomposed).

The output is the dense checkpoint with every tensor copied, the plugin architecture name and a `moe_svd`
block whose `layers` is empty and whose `skipping` holds one beta per MoE layer, chosen from the routing of
the calibration data as `moesvd compress` chooses it (offline/skipping.py). The plugin serves the dense MoE
layers on vLLM's own kernel with only the kept (token, expert) pairs; the PyTorch reference applies the same
rule. A stock vLLM refuses the plugin architecture name instead of silently serving without skipping.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments, option
from offline.skipping import SkipChoice, parse_skip_beta

logger = logging.getLogger(__name__)

METHOD = "skip-only"


@dataclass(frozen=True)
class SkipOptions:
    calib: str = option(help="calibration text: a .txt/.jsonl file, a directory of them, or a `datasets` name")
    skip_beta: str = option("none", "'median' (NAEE: per layer the median of w2/w1) or one beta in [0, 1]",
                            parse=parse_skip_beta, exclusive="skip")
    skip_target: float | None = option(None, "per layer the beta that skips this share of the non-top-1 pairs "
                                       "on the calibration data, in [0, 1)", exclusive="skip")
    num_samples: int = option(64, "calibration windows")
    seq_len: int = option(512, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration sampling")
    batch_size: int = option(8, "calibration windows per forward batch")
    force: bool = option(False, "replace an existing output directory")

    @property
    def choice(self) -> SkipChoice:
        return SkipChoice(parse_skip_beta(self.skip_beta), self.skip_target)


def add_skipping(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: SkipOptions) -> Path:
    """Write the skip-only checkpoint of `model_dir` at `out_dir` (see the module docstring)."""
    import dataclasses

    from moesvd_vllm.architectures import require_servable
    from moesvd_vllm.format.directories import check_output_dir
    from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
    from offline.calibration_data import load_calibration
    from offline.layerwise import LayerwiseModel
    from offline.calibration_stream import embed_calibration, run_layer
    from offline.skipping import SkipCalibration, SkippingError

    choice = options.choice
    if not choice.active:
        raise SkippingError("moesvd skip: give --skip-beta median|<beta> or --skip-target <fraction>")
    out_dir = check_output_dir(out_dir, options.force)
    model = LayerwiseModel(model_dir)
    require_servable(model.model_type)
    calib = load_calibration(options.calib, model_dir, options.num_samples, options.seq_len, options.seed)
    skip = SkipCalibration(choice, model.moe_layers)
    stream = embed_calibration(model, calib, options.batch_size)
    for index in range(model.num_layers):
        layer = model.build_layer(index)
        experts = model.moe_block(layer).experts if index in model.moe_layers else None
        with skip.watching(experts, index, stream.masks):
            stream.hidden = run_layer(model, layer, index, stream, None, f"layer {index}")
        del layer
    with CompressedCheckpointWriter(model.raw_config, out_dir, replace=options.force) as writer:
        with writer.stage("the skip-only copy"):
            for index in range(model.num_layers):
                for name in model.layer_tensor_names(index):
                    writer.add(name, model.tensors.get(name), stage=COPIED)
            for name in model.non_layer_tensor_names():
                writer.add(name, model.tensors.get(name), stage=COPIED)
        writer.finish(method=METHOD, layers={}, options=dataclasses.asdict(options), calibration=calib.info,
                      side_files_from=model.model_dir, skipping=skip.spec())
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="dense Hugging Face MoE checkpoint directory (safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    add_option_arguments(parser, SkipOptions)


def run(args: argparse.Namespace) -> int:
    from moesvd_vllm.errors import MoESVDError
    from moesvd_vllm.format.directories import OutputExistsError
    from moesvd_vllm.format.schema import read_moe_svd_config

    try:
        out = add_skipping(args.model_dir, args.out, from_arguments(SkipOptions, args))
    except (MoESVDError, OutputExistsError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        print(f"moesvd skip: error: {exc}")
        return 1
    skipping = read_moe_svd_config(out).skipping
    print(f"wrote {out}: expert skipping, beta per MoE layer {skipping.betas} (calibration skip fraction "
          f"{skipping.calibration_skip_fraction})")
    return 0
