"""MoE-SVD compression: `compress(model_dir, out_dir, options) -> Path`.

Stages (each timed, with its peak RSS, in report.md/json):
1. calibration data: tokenized and sampled (offline.calibration).
2. sensitivity pass (methods that select layers, offline.pipeline): layer by layer, dense outputs passed
   on, f_i (Eq. 9), a_i (Eq. 10) and r_i; S_L (Eq. 4) per layer.
3. plan: which layers are compressed and to which shapes, to meet the target ratio (offline.pipeline,
   offline.sensitivity).
4. decomposition pass: layer by layer, only one decoder layer in memory (in the checkpoint's dtype when
   it is bf16, else float32); for a planned layer keep its MoE inputs and router choices, then the method
   (offline/methods/) compresses it expert by expert, hands its tensors to the writer (spilled to disk)
   and, with `propagate="compressed"`, writes what the checkpoint computes into the layer; the
   compressed (or dense) layer's outputs are passed on.
5. write: config.json (+ `moe_svd` block), shards + index, tokenizer files, reports; atomically.

Options: `offline.compression_options.CompressionOptions`; methods: `offline.methods` (`moesvd compress
--help` lists them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moesvd_vllm.architectures import MoEDims, require_servable
from moesvd_vllm.format.safetensors_io import check_output_dir
from moesvd_vllm.format.schema import LayerSpec, MoESVDConfig, decomposed_layer_params, dense_layer_params
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline.calibration import CalibrationSet, load_calibration
from offline.checkpoint_io import expert_tensor_names
from offline.compression_options import CompressionOptions, OptionsError
from offline.heap import release_free_heap as _release_free_heap
from offline.layerwise import LayerwiseModel
from offline.methods import CompressedLayer as DecomposedLayer
from offline.pipeline import (
    LayerSensitivity,
    collect_statistics as _collect,
    decompose_layer,
    embed_calibration as _embed,
    make_plan,
    run_layer as _run,
    sensitivity_pass,
)
from offline.report import LayerReport, StageClock, write_reports
from offline.sensitivity import Plan

__all__ = ["CompressionOptions", "OptionsError", "compress"]

logger = logging.getLogger(__name__)


def _copy_layer(model: LayerwiseModel, writer: CompressedCheckpointWriter, index: int,
                replaced: set[str]) -> None:
    for name in model.layer_tensor_names(index):
        if name not in replaced:
            writer.add(name, model.tensors.get(name), stage=COPIED)


# ------------------------------------------------------------------------------------------ pipeline
def compress(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: CompressionOptions) -> Path:
    """Compress `model_dir` into a new checkpoint at `out_dir` (see the module docstring)."""
    torch.manual_seed(options.seed)
    out_dir = check_output_dir(out_dir, options.force)
    clock = StageClock()
    model = LayerwiseModel(model_dir)
    require_servable(model.model_type, offline_only=options.form == "per_expert")
    with clock.stage("calibration data"):
        calib = load_calibration(options.calib, model_dir, options.num_samples, options.seq_len, options.seed)
    logger.info("calibration: %d x %d tokens from %s (sha256 %s)", calib.info.num_samples,
                calib.info.seq_len, calib.info.source, calib.info.sha256[:12])
    sensitivity = None
    if options.effective_selection == "sensitivity":
        with clock.stage("sensitivity pass"):
            sensitivity = sensitivity_pass(model, calib, options)
    with clock.stage("plan"):
        plan = make_plan(model, options, sensitivity)
    logger.info("plan: decompose layers %s at (rank, neurons) %s -> ratio %.4f (target %.4f)",
                list(plan.shapes), [(x.rank, x.intermediate) for x in plan.shapes.values()], plan.ratio,
                options.ratio)
    with CompressedCheckpointWriter(model.raw_config, out_dir, replace=options.force,
                                    max_shard_bytes=options.max_shard_bytes) as writer:
        with clock.stage("decomposition pass"), writer.stage(f"the {options.method} decomposition"):
            specs, reports = _decomposition_pass(model, calib, options, plan, sensitivity, writer)
        with clock.stage("write"):
            for name in model.non_layer_tensor_names():
                writer.add(name, model.tensors.get(name), stage=COPIED)
            block = writer.finish(method=options.method, layers=specs, options=options.recorded(),
                                  calibration=calib.info, side_files_from=model.model_dir)
        summary = _summary(model, options, plan, block, calib)
        write_reports(writer.directory, summary, reports, clock.stages)
    logger.info("wrote %s: ratio %.4f, decomposed layers %s", out_dir, block.params.ratio,
                block.decomposed_layers)
    return out_dir


def _decomposition_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions, plan: Plan,
                        sensitivity: dict[int, LayerSensitivity] | None, writer: CompressedCheckpointWriter
                        ) -> tuple[dict[str, LayerSpec], list[LayerReport]]:
    stream = _embed(model, calib, options.batch_size)
    last_needed = max(plan.ranks)
    specs: dict[str, LayerSpec] = {}
    reports: list[LayerReport] = []
    dense = dense_layer_params(model.dims)
    for index in tqdm(range(model.num_layers), desc=f"{options.method} decomposition", disable=None):
        score = sensitivity[index].score if sensitivity and index in sensitivity else None
        if index not in plan.ranks:
            _copy_layer(model, writer, index, set())
            if index <= last_needed:
                stream.hidden = _run(model, model.build_layer(index), index, stream, None, f"layer {index}")
            if index in model.moe_layers:
                reports.append(_layer_report(index, score, sensitivity, None, dense, model.dims))
            continue
        _release_free_heap()
        layer = model.build_layer(index)
        stats, outputs = _collect(model, layer, index, stream, True, f"layer {index} grams",
                                  options.routing_weighted)
        write_back = options.propagate == "compressed" and index < last_needed
        replaced = set(expert_tensor_names(model.tensors, model.model_type, index, model.dims.num_experts))
        _copy_layer(model, writer, index, replaced)
        result = decompose_layer(model, index, layer, stats, plan.shapes[index], options, score, writer.add,
                                 write_back)
        del stats  # the routed inputs
        logger.info("layer %d: rank %d, banks %d, relative errors %s", index, result.spec.rank,
                    result.spec.num_banks, {k: round(v, 5) for k, v in result.relative_error.items()})
        specs[str(index)] = result.spec
        reports.append(_layer_report(index, score, sensitivity, result, dense, model.dims))
        if write_back:  # the layer now computes what the checkpoint computes: pass its outputs on
            del outputs
            outputs = _run(model, layer, index, stream, None, f"layer {index} compressed")
        stream.hidden = outputs
        del layer, result
    return specs, reports


def _layer_report(index: int, score: float | None, sensitivity: dict[int, LayerSensitivity] | None,
                  result: DecomposedLayer | None, dense: int, dims: MoEDims) -> LayerReport:
    s = sensitivity.get(index) if sensitivity else None
    return LayerReport(
        layer=index, sensitivity=score, decomposed=result is not None,
        rank=result.spec.rank if result else None,
        intermediate=result.spec.kept_intermediate(dims) if result else None,
        bases=result.spec.bases if result else None,
        num_banks=result.spec.num_banks if result else None,
        bank_map=result.spec.bank_map if result else None,
        routing_frequency=s.frequency.tolist() if s else None,
        principal_rank=s.principal_rank.tolist() if s else None,
        outlier_ratio=s.outlier_ratio.tolist() if s else None,
        relative_error=result.relative_error if result else None,
        params_dense=dense,
        params_compressed=decomposed_layer_params(result.spec, dims) if result else dense)


def _summary(model: LayerwiseModel, options: CompressionOptions, plan: Plan, block: MoESVDConfig,
             calib: CalibrationSet) -> dict[str, Any]:
    return {
        "model_dir": str(model.model_dir), "model_type": model.model_type, "method": options.method,
        "target_ratio": options.ratio, "achieved_ratio": round(block.params.ratio, 6),
        "expert_params_dense": block.params.expert_dense,
        "expert_params_compressed": block.params.expert_compressed,
        "decomposed_layers": block.decomposed_layers, "ranks": {str(k): v for k, v in plan.ranks.items()},
        "intermediate": {str(k): s.intermediate for k, s in plan.shapes.items()},
        "calibration": dataclasses.asdict(calib.info), "options": options.recorded(),
    }
