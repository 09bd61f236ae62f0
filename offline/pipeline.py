"""The compressor: `compress(model_dir, out_dir, options) -> Path`, a layer-sequential calibration pipeline
that calls the chosen method's hooks (offline/methods/) with one decoder layer in memory.

The calibration windows are embedded once; then, layer by layer, the layer is built from the checkpoint
(offline/layerwise.py, in the checkpoint's dtype when it is bf16, else float32), run on every batch with
hooks that collect its routed experts' statistics (offline/calibration.py), handed to the method, and its
outputs become the next layer's inputs (llm-compressor's sequential pipeline). The stages, each timed with
its peak RSS in report.md/json:
1. calibration data: tokenized and sampled (offline.calibration_data);
2. sensitivity pass (methods that select layers): f_i (Eq. 9), r_i and a_i (Eq. 10) per expert and S_L
   (Eq. 4) per MoE layer, dense outputs passed on;
3. plan: which layers are compressed and to which shapes, from the method's candidate shapes and
   parameter counts (`make_plan`, offline.sensitivity);
4. decomposition pass: for a planned layer its routed inputs and router choices are kept, the method's
   `compress_layer` compresses it expert by expert and hands each tensor to the writer (spilled to disk)
   and, with `propagate="compressed"`, the layer's outputs are recomputed from what the checkpoint
   computes before they are passed on;
5. write: the format writer (moesvd_vllm.format.writer) checks every tensor against the `moe_svd` block,
   writes shards, index, config.json and side files atomically; then the reports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from moesvd_vllm.architectures import require_servable
from moesvd_vllm.format.directories import check_output_dir, resumable_partial_dir
from moesvd_vllm.format.schema import LayerSpec, decomposed_layer_params, dense_layer_params, expected_layer_tensors
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline import decompose as dec
from offline import distributed
from offline.calibration import ExpertStatistics, ExpertStatisticsHook
from offline.calibration_data import CalibrationSet, load_calibration
from offline.calibration_stream import collect_statistics, embed_calibration, run_layer
from offline.checkpoint_io import expert_tensor_names
from offline.compression_options import CompressionOptions
from offline.devices import resolve_device
from offline.distributed import Ranks
from offline.expert_tensors import LayerExperts
from offline.heap import release_free_heap
from offline.journal import Journal, run_fingerprint, sensitivity_from_measurements, sensitivity_measurements
from offline.layerwise import LayerwiseModel
from offline.methods import CompressedLayer, LayerWork, TensorSink
from offline.methods.experts import layer_experts
from offline.report import LayerReport, StageClock, compression_summary, layer_report, write_reports
from offline.skipping import SkipCalibration
from offline.sensitivity import (
    LayerShape,
    Plan,
    layer_sensitivity,
    monotone_levels,
    plan_decomposition,
    shape_levels,
)

logger = logging.getLogger(__name__)

SENSITIVITY, DECOMPOSITION = "sensitivity", "decomposition"  # the passes' names in the journal


# ------------------------------------------------------------------------------------------ sensitivity pass
@dataclass
class LayerSensitivity:
    score: float  # S_L (Eq. 4)
    frequency: torch.Tensor  # f_i (Eq. 9)
    principal_rank: torch.Tensor  # r_i
    outlier_ratio: torch.Tensor  # a_i (Eq. 10)


def principal_ranks(experts: LayerExperts, threshold: float, ranks: Ranks | None = None) -> torch.Tensor:
    """r_i per expert: the principal rank averaged over its gate, up and down matrices (each process
    measures its share of the experts)."""
    ranks = ranks or Ranks()
    out = torch.zeros(experts.gate.shape[0], dtype=torch.float64, device=ranks.device)
    for e in ranks.my_share(range(experts.gate.shape[0])):
        out[e] = sum(dec.principal_rank(w[e], threshold) for w in (experts.gate, experts.up, experts.down)) / 3
    ranks.all_reduce(out)
    return out.cpu()


def sensitivity_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions,
                     ranks: Ranks | None = None, journal: Journal | None = None) -> dict[int, LayerSensitivity]:
    """f_i, a_i, r_i and S_L for every MoE layer, passing dense outputs on. a_i needs tau * the mean
    |activation| of each expert first, so a MoE layer runs twice: statistics, then outlier counts. With a
    `journal` each finished layer is recorded and the layers it holds are not run again."""
    ranks = ranks or Ranks()
    stream = embed_calibration(model, calib, options.batch_size, ranks)
    result: dict[int, LayerSensitivity] = {}
    finished, start, hidden = (journal.resume_point(SENSITIVITY, model.device, model.num_layers) if journal
                               else ([], 0, None))
    for record in finished:
        if record["measured"] is not None:
            result[record["layer"]] = sensitivity_from_measurements(record["measured"], LayerSensitivity)
    if hidden is not None:
        stream.hidden = hidden
    for index in tqdm(range(start, model.num_layers), desc="sensitivity", disable=None):
        layer = model.build_layer(index)
        if index in model.moe_layers:
            stats, outputs = collect_statistics(model, layer, index, stream, False, f"layer {index} stats",
                                                ranks=ranks)
            hook = ExpertStatisticsHook(stats, model.moe_block(layer).experts)
            hook.outlier_threshold = options.outlier_tau * stats.mean_abs_activation
            try:
                run_layer(model, layer, index, stream, hook, f"layer {index} outliers")
            finally:
                hook.remove()
            stats.sum_outliers_over_ranks(ranks)
            principal = principal_ranks(layer_experts(model, layer), options.rank_threshold, ranks)
            freq, outliers = stats.frequency.cpu(), stats.outlier_ratio().cpu()
            result[index] = LayerSensitivity(layer_sensitivity(freq, principal, outliers), freq, principal,
                                             outliers)
            logger.info("layer %d: S_L = %.4g", index, result[index].score)
        else:
            outputs = run_layer(model, layer, index, stream, None, f"layer {index}")
        stream.hidden = outputs
        del layer
        if journal is not None:
            measured = sensitivity_measurements(result[index]) if index in result else None
            more = index + 1 < model.num_layers
            journal.finish_layer(SENSITIVITY, index, {"measured": measured, "needs_stream": more},
                                 stream.hidden if more else None)
    if journal is not None:
        journal.drop_streams(SENSITIVITY)
    return result


# ------------------------------------------------------------------------------------------ plan
def make_plan(model: LayerwiseModel, options: CompressionOptions,
              sensitivity: dict[int, LayerSensitivity] | None) -> Plan:
    """Which layers are compressed and to which shapes, from the method's candidate shapes and counts."""
    dims, method = model.dims, options.make_method()
    scores = {i: (sensitivity[i].score if sensitivity else 0.0) for i in model.moe_layers}
    max_rank, rank_step = method.rank_steps(dims)
    candidates = shape_levels(hidden=dims.hidden, intermediate=dims.intermediate, rank_step=rank_step,
                              max_rank=max_rank, intermediate_step=options.intermediate_step,
                              min_intermediate_fraction=options.effective_min_intermediate_fraction)

    def layer_params(shape: LayerShape) -> int:
        return decomposed_layer_params(method.counting_spec(dims, shape), dims)

    dense = dense_layer_params(dims)
    return plan_decomposition(
        scores, options.ratio, dense_layer=dense, levels=monotone_levels(candidates, layer_params, dense),
        layer_params=layer_params, tolerance=options.ratio_tolerance,
        min_kept_fraction=options.min_kept_fraction, decompose_all=options.effective_selection == "all")


# ------------------------------------------------------------------------------------------ one layer
def decompose_layer(model: LayerwiseModel, index: int, layer: nn.Module, stats: ExpertStatistics,
                    shape: LayerShape, options: CompressionOptions, sensitivity: float | None,
                    add: Callable[[str, torch.Tensor], None], write_back: bool = False,
                    ranks: Ranks | None = None) -> CompressedLayer:
    """Compress the routed experts of the built `layer` (its weights are the dense ones) with the options'
    method, handing each written tensor to `add` as soon as it exists. With `write_back` each expert's
    weights in `layer` are replaced by what the compressed checkpoint computes, after its Grams. Every
    rank of `ranks` takes part and ends with the same layer; each hands every tensor to its `add`."""
    work = LayerWork(model, index, layer, stats, shape, sensitivity, write_back, TensorSink(add),
                     ranks or Ranks())
    result = options.make_method().compress_layer(work)
    expected = expected_layer_tensors(model.model_type, index, result.spec, model.dims, model.expert_dtype())
    if result.written != expected:  # a bug in the method, never a user error: say what and where
        differing = [f"{name}: wrote {result.written.get(name)}, the schema needs {expected.get(name)}"
                     for name in sorted(set(result.written) | set(expected))
                     if result.written.get(name) != expected.get(name)]
        raise AssertionError(
            f"layer {index}: method {options.method!r} wrote tensors that differ from its own layer spec "
            f"(rank {result.spec.rank}, banks {result.spec.num_banks}, kept neurons {result.spec.intermediate}); "
            f"nothing was written to the output. {'; '.join(differing[:3])}. This is a bug of the method: "
            "please report it with the model's config.json; another --method or --ratio may avoid it")
    return result


# ------------------------------------------------------------------------------------------ decomposition pass
def _copy_layer_tensors(model: LayerwiseModel, writer: CompressedCheckpointWriter | None, index: int,
                        replaced: set[str]) -> None:
    if writer is None:  # not the writing rank
        return
    for name in model.layer_tensor_names(index):
        if name not in replaced:
            writer.add(name, model.tensors.get(name), stage=COPIED)


def _discard(name: str, tensor: torch.Tensor) -> None:
    """The tensor sink of the ranks that do not write."""


def decomposition_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions, plan: Plan,
                       sensitivity: dict[int, LayerSensitivity] | None, writer: CompressedCheckpointWriter | None,
                       skip: SkipCalibration | None = None, ranks: Ranks | None = None,
                       journal: Journal | None = None) -> tuple[dict[str, LayerSpec], list[LayerReport]]:
    """Every layer's tensors to `writer` (None on the ranks that do not write): planned layers compressed
    by the method, the others copied; the layers after the last planned one are not run (unless `skip`
    calibrates expert skipping on every MoE layer: it watches each MoE layer's routing, offline/skipping.py).
    With a `journal` each finished layer is recorded, and the layers it already holds are skipped (a
    resumed run)."""
    ranks = ranks or Ranks()
    stream = embed_calibration(model, calib, options.batch_size, ranks)
    skip = skip or SkipCalibration(options.skip_choice, model.moe_layers)
    skip.gather = ranks.all_gather_rows  # beta from every rank's routing ratios
    last_needed = model.num_layers - 1 if skip.active else max(plan.ranks)
    specs: dict[str, LayerSpec] = {}
    reports: list[LayerReport] = []
    finished, start, hidden = (journal.resume_point(DECOMPOSITION, model.device, model.num_layers) if journal
                               else ([], 0, None))
    for record in finished:
        if record["spec"] is not None:
            specs[str(record["layer"])] = LayerSpec(**record["spec"])
        if record["report"] is not None:
            reports.append(LayerReport(**record["report"]))
        if record.get("skip") is not None:
            skip.betas[str(record["layer"])], skip.fractions[str(record["layer"])] = record["skip"]
    if hidden is not None:
        stream.hidden = hidden
    dense = dense_layer_params(model.dims)
    add = writer.add if writer is not None else _discard
    for index in tqdm(range(start, model.num_layers), desc=f"{options.method} decomposition", disable=None):
        score = sensitivity[index].score if sensitivity and index in sensitivity else None
        measured = sensitivity.get(index) if sensitivity else None
        spec = report = None
        if index not in plan.ranks:
            _copy_layer_tensors(model, writer, index, set())
            if index <= last_needed:
                layer = model.build_layer(index)
                with skip.watching(_experts_of(model, layer, index), index, stream.masks):
                    stream.hidden = run_layer(model, layer, index, stream, None, f"layer {index}")
            if index in model.moe_layers:
                report = layer_report(index, score, measured, None, dense, model.dims)
        else:
            release_free_heap()
            layer = model.build_layer(index)
            with skip.watching(model.moe_block(layer).experts, index, stream.masks):
                stats, outputs = collect_statistics(model, layer, index, stream, True, f"layer {index} grams",
                                                    options.routing_weighted, ranks)
            write_back = options.propagate == "compressed" and index < last_needed
            replaced = set(expert_tensor_names(model.tensors, model.model_type, index, model.dims.num_experts))
            _copy_layer_tensors(model, writer, index, replaced)
            result = decompose_layer(model, index, layer, stats, plan.shapes[index], options, score, add,
                                     write_back, ranks)
            del stats  # the routed inputs
            logger.info("layer %d: rank %d, banks %d, relative errors %s", index, result.spec.rank,
                        result.spec.num_banks, {k: round(v, 5) for k, v in result.relative_error.items()})
            spec = specs[str(index)] = result.spec
            report = layer_report(index, score, measured, result, dense, model.dims)
            if write_back:  # the layer now computes what the checkpoint computes: pass its outputs on
                del outputs
                outputs = run_layer(model, layer, index, stream, None, f"layer {index} compressed")
            stream.hidden = outputs
            del layer, result
        if report is not None:
            reports.append(report)
        if journal is not None:
            more = index < last_needed
            watched = str(index) in skip.betas
            journal.finish_layer(DECOMPOSITION, index, {
                "spec": asdict(spec) if spec else None, "report": asdict(report) if report else None,
                "skip": [skip.betas[str(index)], skip.fractions[str(index)]] if watched else None,
                "needs_stream": more}, stream.hidden if more else None, writer)
    return specs, reports


def _experts_of(model: LayerwiseModel, layer: nn.Module, index: int) -> nn.Module | None:
    return model.moe_block(layer).experts if index in model.moe_layers else None


# ------------------------------------------------------------------------------------------ compress
def compress(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: CompressionOptions) -> Path:
    """Compress `model_dir` into a new checkpoint at `out_dir` (the stages of the module docstring), on
    `options.device`; under torchrun every process runs this and rank 0 writes (offline/distributed.py)."""
    device = resolve_device(options.device)
    ranks, started = distributed.start(device)
    try:
        return _compress(Path(model_dir), Path(out_dir), options, ranks)
    finally:
        distributed.stop(started)


def _compress(model_dir: Path, out_dir: Path, options: CompressionOptions, ranks: Ranks) -> Path:
    torch.manual_seed(options.seed)
    out_dir = check_output_dir(out_dir, options.force)
    clock = StageClock()
    model = LayerwiseModel(model_dir, device=ranks.device)
    require_servable(model.model_type, offline_only=not options.method_class.servable)
    with clock.stage("calibration data"):
        calib = load_calibration(options.calib, model_dir, options.num_samples, options.seq_len, options.seed)
    logger.info("calibration: %d x %d tokens from %s (sha256 %s)", calib.info.num_samples,
                calib.info.seq_len, calib.info.source, calib.info.sha256[:12])
    header = run_fingerprint(model_dir, options, calib.info, ranks.size, ranks.device)
    journal = Journal.open(out_dir, header, ranks, resume=options.resume, force=options.force)
    try:
        result = _compress_journaled(model, calib, out_dir, options, ranks, journal, clock)
    except (KeyboardInterrupt, SystemExit):
        if not journal.records:
            journal.remove()
        else:
            logger.warning("interrupted: %d finished layers of its passes are journaled in %s; `--resume` "
                           "continues",
                           len(journal.records), journal.directory)
        raise
    except BaseException:
        journal.remove()  # an error would repeat on resume: nothing is kept
        raise
    ranks.barrier()
    journal.remove()
    return result


def _compress_journaled(model: LayerwiseModel, calib: CalibrationSet, out_dir: Path, options: CompressionOptions,
                        ranks: Ranks, journal: Journal, clock: StageClock) -> Path:
    sensitivity = None
    if options.effective_selection == "sensitivity":
        with clock.stage("sensitivity pass"):
            sensitivity = sensitivity_pass(model, calib, options, ranks, journal)
    with clock.stage("plan"):
        plan = make_plan(model, options, sensitivity)
    logger.info("plan: decompose layers %s at (rank, neurons) %s -> ratio %.4f (target %.4f)",
                list(plan.shapes), [(x.rank, x.intermediate) for x in plan.shapes.values()], plan.ratio,
                options.ratio)
    resumed_at = len(journal.of_kind(DECOMPOSITION)) if options.resume else None  # journaled in order
    skip = SkipCalibration(options.skip_choice, model.moe_layers)
    if not ranks.is_writer:
        decomposition_pass(model, calib, options, plan, sensitivity, None, skip, ranks, journal)
        return out_dir
    with CompressedCheckpointWriter(model.raw_config, out_dir, replace=options.force,
                                    max_shard_bytes=options.max_shard_bytes,
                                    partial=resumable_partial_dir(out_dir), resume_from=journal.writer_state(),
                                    keep_on_interrupt=lambda: bool(journal.records)) as writer:
        with clock.stage("decomposition pass"), writer.stage(f"the {options.method} decomposition"):
            specs, reports = decomposition_pass(model, calib, options, plan, sensitivity, writer, skip, ranks,
                                                journal)
        with clock.stage("write"):
            for name in model.non_layer_tensor_names():
                writer.add(name, model.tensors.get(name), stage=COPIED)
            block = writer.finish(method=options.method, layers=specs, options=options.recorded(),
                                  calibration=calib.info, side_files_from=model.model_dir,
                                  skipping=skip.spec())
        summary = compression_summary(model, options, plan, block, calib.info)
        summary.update(world_size=ranks.size, device=ranks.device.type, resumed_at_layer=resumed_at)
        write_reports(writer.directory, summary, reports, clock.stages)
    logger.info("wrote %s: ratio %.4f, decomposed layers %s", out_dir, block.params.ratio,
                block.decomposed_layers)
    return out_dir
