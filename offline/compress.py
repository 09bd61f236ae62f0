"""MoE-SVD compression pipeline: `compress(model_dir, out_dir, options) -> Path`.

Stages (each timed, with its peak RSS, in report.md/json):
1. calibration data: tokenized and sampled (offline.calibration).
2. sensitivity pass (methods with selective decomposition): layer by layer, dense outputs passed on,
   collect f_i (Eq. 9), a_i (Eq. 10) and r_i; S_L (Eq. 4) per layer.
3. plan: which layers are decomposed and at which ranks, to meet the target ratio (offline.sensitivity).
4. decomposition pass: layer by layer, only one decoder layer in memory; for a planned layer collect the
   experts' Gram matrices, decompose, write its tensors, and pass the compressed layer's outputs on
   (`propagate="compressed"`, llm-compressor's sequential pipeline) or the dense ones.
5. write: config.json (+ `moe_svd` block), shards + index, tokenizer files, reports; atomically.

Methods (`moe_svd.method`):
* "moe-svd-stacked" (default): shared input basis A = top-r subspace of all experts' whitened
  gate/up rows weighted by routing frequency; shared output basis B = top-r principal subspace of the
  routed MoE output (`output_basis="block"`, or of all experts' whitened down projections with
  "experts"); per-expert factors by whitened least squares (Grams weighted by routing weight^2 with
  `routing_weighted`); no trimming.
* "moe-svd": the paper: bases from the most frequently routed expert (Eq. 5-6), factors fitted by
  whitened least squares, U-trimming (Eq. 7-8) keeping the 2 most frequent experts per group of 8.
* "svd", "whitened-svd": per-expert truncated SVD, plain or activation-weighted (SVD-LLM style), all
  MoE layers at one rank; the "per_expert" form (evaluated by offline.reference, not servable).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moesvd_vllm.schema import (
    BASIS_DTYPES,
    CONFIG_KEY,
    FORMAT_VERSION,
    PLUGIN_ARCHITECTURES,
    RANK_MULTIPLE,
    LayerSpec,
    MoEDims,
    MoESVDConfig,
    ParamCounts,
    decomposed_layer_params,
    dense_layer_params,
    expected_layer_tensors,
    moe_layout,
)
from offline import decompose as dec
from offline.calibration import CalibrationSet, ExpertStatistics, ExpertStatisticsHook, load_calibration
from offline.checkpoint_io import atomic_checkpoint_dir, check_output_dir, expert_tensor_names
from offline.expert_tensors import (
    dtype_name,
    LayerExperts,
    ShardedSafetensorsWriter,
    copy_side_files,
    read_layer_experts,
    torch_dtype,
    write_config,
)
from offline.layerwise import LayerInputs, LayerwiseModel
from offline.report import LayerReport, StageClock, write_reports
from offline.sensitivity import Plan, RatioError, layer_sensitivity, plan_decomposition

logger = logging.getLogger(__name__)

METHODS = ("moe-svd-stacked", "moe-svd", "svd", "whitened-svd")
SHARED_BASIS_METHODS = ("moe-svd-stacked", "moe-svd")
PROPAGATE = ("compressed", "dense")
SELECTIONS = ("sensitivity", "all")
OUTPUT_BASES = ("block", "experts")


class OptionsError(ValueError):
    """Invalid compression options."""


@dataclass(frozen=True)
class CompressionOptions:
    """Everything `compress` needs besides the input and output directories (recorded in moe_svd.options)."""

    ratio: float  # fraction of routed-expert parameters to remove, in (0, 1)
    calib: str  # text file, directory of .txt/.jsonl, or a `datasets` name (needs network)
    method: str = "moe-svd-stacked"
    num_samples: int = 256  # calibration windows (paper: 256)
    seq_len: int = 2048  # tokens per window (paper: 2048)
    seed: int = 0
    batch_size: int = 8
    propagate: str = "compressed"  # outputs passed to the next layer: of the compressed or dense layer
    selection: str | None = None  # "sensitivity" (selective, Eq. 4) or "all"; None: method default
    outlier_tau: float = 2.0  # tau of Eq. 10 (Algorithm 1's default)
    rank_threshold: float = 0.01  # r_i: singular values above this times the largest (Algorithm 1)
    min_rank_fraction: float = 0.5  # plan: prefer few decomposed layers only while ranks stay >= this
    ratio_tolerance: float = 0.01  # achieved ratio within this of `ratio`
    # dtype of the shared bases (factors keep the model dtype). "auto" = the model's dtype: bf16 bases run on
    # AMX/AVX512-BF16 CPUs and GPUs natively (measured faster, docs/performance.md); on AVX2-only CPUs,
    # which have no bf16 matmul, choose "float32".
    basis_dtype: str = "auto"
    routing_weighted: bool = True  # weight each token's Gram contribution by its routing weight^2
    output_basis: str = "block"  # moe-svd-stacked B: "block" (PCA of the routed MoE output) or "experts"
    trim_keep: int | None = None  # U-trimming: experts kept per group; None: method default (moe-svd 2)
    trim_group_size: int = 8  # U-trimming group size (App. D.4: DeepSeek's 64 experts in 8 groups)
    prior_tokens: float = 8.0  # per-expert Gram + this many "tokens" of the layer's average Gram
    damp: float = 1e-4  # + damp * mean(diag) * I on per-expert Grams
    baseline_rank_step: int = 1  # rank granularity of the per_expert baselines
    max_shard_bytes: int = 2 * 1024**3
    force: bool = False  # replace an existing output directory

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise OptionsError(f"unknown compression option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def basis_dtype_for(self, model_dtype: torch.dtype) -> str:
        """The stored dtype of the bases for a model whose expert weights are `model_dtype`."""
        return dtype_name(model_dtype) if self.basis_dtype == "auto" else self.basis_dtype

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionsError(f"method {self.method!r} is not one of {METHODS}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise RatioError(f"compression ratio must be strictly between 0 and 1 (e.g. 0.4), got {self.ratio}")
        if self.propagate not in PROPAGATE:
            raise OptionsError(f"propagate {self.propagate!r} is not one of {PROPAGATE}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise OptionsError(f"selection {self.selection!r} is not one of {SELECTIONS}")
        if self.output_basis not in OUTPUT_BASES:
            raise OptionsError(f"output_basis {self.output_basis!r} is not one of {OUTPUT_BASES}")
        if self.basis_dtype != "auto" and self.basis_dtype not in BASIS_DTYPES:
            raise OptionsError(f"basis_dtype {self.basis_dtype!r} is not 'auto' or one of {BASIS_DTYPES}")
        if self.trim_keep is not None and self.trim_keep < 1:
            raise OptionsError(f"trim_keep must be >= 1, got {self.trim_keep}")
        for name in ("num_samples", "seq_len", "batch_size", "trim_group_size", "baseline_rank_step"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def form(self) -> str:
        return "shared_basis" if self.method in SHARED_BASIS_METHODS else "per_expert"

    @property
    def effective_selection(self) -> str:
        if self.selection is not None:
            return self.selection
        return "sensitivity" if self.form == "shared_basis" else "all"

    @property
    def effective_trim_keep(self) -> int | None:
        if self.trim_keep is not None:
            return self.trim_keep
        return 2 if self.method == "moe-svd" else None

    def recorded(self) -> dict[str, Any]:
        """Options as stored in `moe_svd.options` (defaults resolved; no output-only flags)."""
        out = dataclasses.asdict(self)
        for key in ("force", "max_shard_bytes"):
            out.pop(key)
        out["selection"] = self.effective_selection
        out["trim_keep"] = self.effective_trim_keep
        return out


# ------------------------------------------------------------------------------------------ helpers
def _num_banks(num_experts: int, keep: int | None, group_size: int) -> int:
    if keep is None:
        return num_experts
    return sum(min(keep, min(group_size, num_experts - s)) for s in range(0, num_experts, group_size))


def _spec(options: CompressionOptions, dims: MoEDims, rank: int, bank_map: list[int] | None = None,
          sensitivity: float | None = None) -> LayerSpec:
    if bank_map is None:
        banks = _num_banks(dims.num_experts, options.effective_trim_keep, options.trim_group_size)
        bank_map = [min(e, banks - 1) for e in range(dims.num_experts)]  # placeholder with K banks
    # Parameter counting only: the basis dtype does not change the count.
    return LayerSpec(form=options.form, rank=rank, num_experts=dims.num_experts, bank_map=bank_map,
                     sensitivity=sensitivity)


def _batches(calib: CalibrationSet, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(calib.input_ids[i:i + batch_size], calib.attention_mask[i:i + batch_size])
            for i in range(0, calib.input_ids.shape[0], batch_size)]


@dataclass
class _Stream:
    """Hidden states of all calibration batches at the current layer, with each batch's layer inputs."""

    hidden: list[torch.Tensor]
    inputs: list[LayerInputs]
    masks: list[torch.Tensor]


def _embed(model: LayerwiseModel, calib: CalibrationSet, batch_size: int) -> _Stream:
    hidden, inputs, masks = [], [], []
    for ids, mask in _batches(calib, batch_size):
        h = model.embed(ids)
        hidden.append(h)
        inputs.append(model.layer_inputs(h, mask))
        masks.append(mask.bool())
    return _Stream(hidden, inputs, masks)


def _run(model: LayerwiseModel, layer, index: int, stream: _Stream, hook: ExpertStatisticsHook | None,
         desc: str) -> list[torch.Tensor]:
    outputs = []
    for h, inp, mask in tqdm(list(zip(stream.hidden, stream.inputs, stream.masks)), desc=desc,
                             leave=False, disable=None):
        if hook is not None:
            hook.token_mask = mask.reshape(-1)
        outputs.append(model.run_layer(layer, index, h, inp))
    return outputs


def _collect(model: LayerwiseModel, layer, index: int, stream: _Stream, collect_grams: bool,
             desc: str, routing_weighted: bool = False) -> tuple[ExpertStatistics, list[torch.Tensor]]:
    dims = model.dims
    stats = ExpertStatistics(dims.num_experts, dims.hidden, dims.intermediate, collect_grams=collect_grams,
                             routing_weighted=routing_weighted)
    hook = ExpertStatisticsHook(stats, model.moe_block(layer).experts)
    try:
        outputs = _run(model, layer, index, stream, hook, desc)
    finally:
        hook.remove()
    return stats, outputs


# ------------------------------------------------------------------------------------------ stage 2
@dataclass
class LayerSensitivity:
    score: float
    frequency: torch.Tensor
    principal_rank: torch.Tensor
    outlier_ratio: torch.Tensor


def _principal_ranks(experts: LayerExperts, threshold: float) -> torch.Tensor:
    ranks = [sum(dec.principal_rank(w[e], threshold) for w in (experts.gate, experts.up, experts.down)) / 3
             for e in range(experts.gate.shape[0])]
    return torch.tensor(ranks, dtype=torch.float64)


def sensitivity_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions
                     ) -> dict[int, LayerSensitivity]:
    """f_i, a_i, r_i and S_L for every MoE layer, passing dense outputs on."""
    stream = _embed(model, calib, options.batch_size)
    result: dict[int, LayerSensitivity] = {}
    for index in tqdm(range(model.num_layers), desc="sensitivity", disable=None):
        layer = model.build_layer(index)
        if index in model.moe_layers:
            stats, outputs = _collect(model, layer, index, stream, False, f"layer {index} stats")
            hook = ExpertStatisticsHook(stats, model.moe_block(layer).experts)
            hook.outlier_threshold = options.outlier_tau * stats.mean_abs_activation
            try:
                _run(model, layer, index, stream, hook, f"layer {index} outliers")
            finally:
                hook.remove()
            experts = read_layer_experts(model.tensors, model.model_type, index, model.dims)
            ranks = _principal_ranks(experts, options.rank_threshold)
            freq, outliers = stats.frequency, stats.outlier_ratio()
            result[index] = LayerSensitivity(layer_sensitivity(freq, ranks, outliers), freq, ranks, outliers)
            logger.info("layer %d: S_L = %.4g", index, result[index].score)
        else:
            outputs = _run(model, layer, index, stream, None, f"layer {index}")
        stream.hidden = outputs
        del layer
    return result


# ------------------------------------------------------------------------------------------ stage 3
def make_plan(model: LayerwiseModel, options: CompressionOptions,
              sensitivity: dict[int, LayerSensitivity] | None) -> Plan:
    dims = model.dims
    scores = {i: (sensitivity[i].score if sensitivity else 0.0) for i in model.moe_layers}
    if options.form == "shared_basis":
        max_rank, step = dims.hidden, RANK_MULTIPLE
    else:
        max_rank, step = min(dims.hidden, dims.intermediate), options.baseline_rank_step
    return plan_decomposition(
        scores, options.ratio, dense_layer=dense_layer_params(dims),
        decomposed_layer=lambda r: decomposed_layer_params(_spec(options, dims, r), dims),
        max_rank=max_rank, rank_step=step, tolerance=options.ratio_tolerance,
        min_rank_fraction=options.min_rank_fraction,
        decompose_all=options.effective_selection == "all")


# ------------------------------------------------------------------------------------------ stage 4
@dataclass
class DecomposedLayer:
    spec: LayerSpec
    tensors: dict[str, torch.Tensor]  # on-disk name -> tensor (stored dtypes)
    gate: torch.Tensor  # [E, I, H] the dense weights the stored factors compute (for propagation)
    up: torch.Tensor
    down: torch.Tensor  # [E, H, I]
    relative_error: dict[str, float]


def _regularized_grams(stats: ExpertStatistics, options: CompressionOptions
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-expert input / intermediate Grams, each with a small prior from the layer-wide average."""
    total = max(stats.total_tokens, 1)
    in_prior = stats.gram_layer / total
    mid_prior = stats.gram_mid.sum(0) / max(int(stats.routed_tokens.sum()), 1)
    grams_in = [dec.regularized_gram(stats.gram_in[e], in_prior, options.prior_tokens, options.damp)
                for e in range(stats.num_experts)]
    grams_mid = [dec.regularized_gram(stats.gram_mid[e], mid_prior, options.prior_tokens, options.damp)
                 for e in range(stats.num_experts)]
    return grams_in, grams_mid


def _errors(experts: LayerExperts, gate, up, down, grams_in, grams_mid) -> dict[str, float]:
    out = {}
    for name, ref, approx, grams in (("gate", experts.gate, gate, grams_in), ("up", experts.up, up, grams_in),
                                     ("down", experts.down, down, grams_mid)):
        num = den = 0.0
        for e in range(ref.shape[0]):
            n, d = dec.whitened_error(ref[e], approx[e], grams[e])
            num, den = num + n, den + d
        out[name] = num / den if den > 0 else 0.0
    return out


def _shared_basis_layer(model: LayerwiseModel, index: int, experts: LayerExperts, stats: ExpertStatistics,
                        rank: int, options: CompressionOptions, sensitivity: float | None) -> DecomposedLayer:
    dims, where = model.dims, f"layer {index}"
    grams_in, grams_mid = _regularized_grams(stats, options)
    num_experts = dims.num_experts
    if options.method == "moe-svd-stacked":
        in_weights = [torch.cat([experts.gate[e], experts.up[e]]) for e in range(num_experts)]
        basis_in = dec.stacked_input_basis(in_weights, stats.routed_tokens.double(),
                                           stats.gram_layer, rank, where)
        basis_out = (dec.block_output_basis(stats.gram_out, rank) if options.output_basis == "block"
                     else dec.stacked_output_basis(list(experts.down), grams_mid, rank))
    else:  # "moe-svd": the most frequently routed expert's bases (Eq. 5)
        top = int(torch.argmax(stats.routed_tokens))
        basis_in, basis_out = dec.most_frequent_expert_bases(
            torch.cat([experts.gate[top], experts.up[top]]), experts.down[top], grams_in[top],
            grams_mid[top], rank, where)
    # the stored (rounded) bases are what the server multiplies with: fit the factors against them
    model_dtype = experts.gate.dtype
    basis_dtype_name = options.basis_dtype_for(model_dtype)
    basis_dtype = torch_dtype(basis_dtype_name)
    basis_in = basis_in.to(basis_dtype).double()
    basis_out = basis_out.to(basis_dtype).double()
    inter = dims.intermediate
    gate_up_f = [dec.fit_input_factor(torch.cat([experts.gate[e], experts.up[e]]), basis_in, grams_in[e])
                 .to(model_dtype) for e in range(num_experts)]  # one solve serves gate and up
    gate_f = [f[:inter] for f in gate_up_f]
    up_f = [f[inter:] for f in gate_up_f]
    down_f = [dec.fit_output_factor(experts.down[e], basis_out).to(model_dtype) for e in range(num_experts)]
    # what the stored (rounded) factors compute, float32 to bound memory on large layers
    own_gate = torch.stack([(g.double() @ basis_in).float() for g in gate_f])
    own_up = torch.stack([(u.double() @ basis_in).float() for u in up_f])
    own_down = torch.stack([(basis_out @ d.double()).float() for d in down_f])

    keep = options.effective_trim_keep
    if keep is None or keep >= min(options.trim_group_size, num_experts):
        bank_map, kept = list(range(num_experts)), list(range(num_experts))
    else:  # U-trimming: serve each trimmed expert by the kept expert that reproduces it best
        distance = torch.full((num_experts, num_experts), float("inf"), dtype=torch.float64)
        group = options.trim_group_size
        for e in range(num_experts):
            for k in range((e // group) * group, min((e // group + 1) * group, num_experts)):
                distance[e, k] = (dec.whitened_error(experts.gate[e], own_gate[k], grams_in[e])[0]
                                  + dec.whitened_error(experts.up[e], own_up[k], grams_in[e])[0]
                                  + dec.whitened_error(experts.down[e], own_down[k], grams_mid[e])[0])
        bank_map, kept = dec.trimming_bank_map(stats.frequency, keep, options.trim_group_size, distance)
    spec = LayerSpec(form="shared_basis", rank=rank, num_experts=num_experts, bank_map=bank_map,
                     basis_dtype=basis_dtype_name, sensitivity=sensitivity)
    layout = moe_layout(model.model_type)
    prefix = f"model.layers.{index}.{layout.moe_module}"
    tensors = {f"{prefix}.moe_svd_in.weight": basis_in.to(basis_dtype),
               f"{prefix}.moe_svd_out.weight": basis_out.to(basis_dtype)}
    for bank, e in enumerate(kept):
        tensors[f"{prefix}.experts.{bank}.{layout.gate_proj}.weight"] = gate_f[e].contiguous()
        tensors[f"{prefix}.experts.{bank}.{layout.up_proj}.weight"] = up_f[e].contiguous()
        tensors[f"{prefix}.experts.{bank}.{layout.down_proj}.weight"] = down_f[e].contiguous()
    source = [kept[k] for k in bank_map]
    gate, up, down = own_gate[source], own_up[source], own_down[source]
    return DecomposedLayer(spec, tensors, gate, up, down, _errors(experts, gate, up, down, grams_in, grams_mid))


def _per_expert_layer(model: LayerwiseModel, index: int, experts: LayerExperts, stats: ExpertStatistics,
                      rank: int, options: CompressionOptions, sensitivity: float | None) -> DecomposedLayer:
    dims, where = model.dims, f"layer {index}"
    grams_in, grams_mid = _regularized_grams(stats, options)
    whitened = options.method == "whitened-svd"
    layout = moe_layout(model.model_type)
    prefix = f"model.layers.{index}.{layout.moe_module}"
    model_dtype = experts.gate.dtype
    tensors: dict[str, torch.Tensor] = {}
    approx: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    for e in range(dims.num_experts):
        s_in = dec.whitening_factor(grams_in[e], f"{where} expert {e} input") if whitened else None
        s_mid = dec.whitening_factor(grams_mid[e], f"{where} expert {e} down input") if whitened else None
        for key, proj, weight, s in (("gate", layout.gate_proj, experts.gate[e], s_in),
                                     ("up", layout.up_proj, experts.up[e], s_in),
                                     ("down", layout.down_proj, experts.down[e], s_mid)):
            low = dec.truncated_svd(weight, rank, s)
            a, b = low.a.to(model_dtype), low.b.to(model_dtype)
            tensors[f"{prefix}.experts.{e}.{proj}.lora_a"] = a
            tensors[f"{prefix}.experts.{e}.{proj}.lora_b"] = b
            approx[key].append((b.double() @ a.double()).float())
    gate, up, down = (torch.stack(approx[k]) for k in ("gate", "up", "down"))
    spec = LayerSpec(form="per_expert", rank=rank, num_experts=dims.num_experts,
                     bank_map=list(range(dims.num_experts)), sensitivity=sensitivity)  # no bases
    return DecomposedLayer(spec, tensors, gate, up, down, _errors(experts, gate, up, down, grams_in, grams_mid))


def decompose_layer(model: LayerwiseModel, index: int, stats: ExpertStatistics, rank: int,
                    options: CompressionOptions, sensitivity: float | None) -> DecomposedLayer:
    experts = read_layer_experts(model.tensors, model.model_type, index, model.dims)
    build = _shared_basis_layer if options.form == "shared_basis" else _per_expert_layer
    result = build(model, index, experts, stats, rank, options, sensitivity)
    expected = expected_layer_tensors(model.model_type, index, result.spec, model.dims,
                                      str(experts.gate.dtype).removeprefix("torch."))
    got = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in result.tensors.items()}
    if got != expected:  # a bug in this module, never a user error
        raise AssertionError(f"layer {index}: written tensors differ from the schema: "
                             f"{sorted(set(got) ^ set(expected))[:4]} ...")
    return result


def _swap_experts(layer, result: DecomposedLayer, compute_dtype: torch.dtype) -> None:
    """Make the in-memory layer compute what the compressed checkpoint computes."""
    experts = layer.mlp.experts
    gate_up = torch.cat([result.gate, result.up], dim=1).to(compute_dtype)
    experts.gate_up_proj.data = gate_up
    experts.down_proj.data = result.down.to(compute_dtype)


def _copy_layer(model: LayerwiseModel, writer: ShardedSafetensorsWriter, index: int,
                replaced: set[str]) -> None:
    for name in model.layer_tensor_names(index):
        if name not in replaced:
            writer.add(name, model.tensors.get(name))


# ------------------------------------------------------------------------------------------ pipeline
def compress(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: CompressionOptions) -> Path:
    """Compress `model_dir` into a new checkpoint at `out_dir` (see the module docstring)."""
    torch.manual_seed(options.seed)
    out_dir = check_output_dir(out_dir, options.force)
    clock = StageClock()
    model = LayerwiseModel(model_dir)
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
    logger.info("plan: decompose layers %s at ranks %s -> ratio %.4f (target %.4f)",
                list(plan.ranks), list(plan.ranks.values()), plan.ratio, options.ratio)
    with atomic_checkpoint_dir(out_dir, force=options.force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=options.max_shard_bytes)
        with clock.stage("decomposition pass"):
            specs, reports = _decomposition_pass(model, calib, options, plan, sensitivity, writer)
        with clock.stage("write"):
            for name in model.non_layer_tensor_names():
                writer.add(name, model.tensors.get(name))
            writer.finish()
            block = _moe_svd_block(model, options, specs, calib)
            config = dict(model.raw_config)
            config["architectures"] = _plugin_architectures(config)
            config[CONFIG_KEY] = block.to_dict()
            write_config(tmp, config)
            copy_side_files(model.model_dir, tmp)
        summary = _summary(model, options, plan, block, calib)
        write_reports(tmp, summary, reports, clock.stages)
    logger.info("wrote %s: ratio %.4f, decomposed layers %s", out_dir, block.params.ratio,
                block.decomposed_layers)
    return out_dir


def _decomposition_pass(model: LayerwiseModel, calib: CalibrationSet, options: CompressionOptions, plan: Plan,
                        sensitivity: dict[int, LayerSensitivity] | None, writer: ShardedSafetensorsWriter
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
        layer = model.build_layer(index)
        stats, outputs = _collect(model, layer, index, stream, True, f"layer {index} grams",
                                  options.routing_weighted)
        result = decompose_layer(model, index, stats, plan.ranks[index], options, score)
        logger.info("layer %d: rank %d, banks %d, relative errors %s", index, result.spec.rank,
                    result.spec.num_banks, {k: round(v, 5) for k, v in result.relative_error.items()})
        replaced = set(expert_tensor_names(model.tensors, model.model_type, index, model.dims.num_experts))
        _copy_layer(model, writer, index, replaced)
        for name, tensor in result.tensors.items():
            writer.add(name, tensor)
        specs[str(index)] = result.spec
        reports.append(_layer_report(index, score, sensitivity, result, dense, model.dims))
        if options.propagate == "compressed" and index < last_needed:
            _swap_experts(layer, result, model.compute_dtype)
            outputs = _run(model, layer, index, stream, None, f"layer {index} compressed")
        stream.hidden = outputs
        del layer, stats, result
    return specs, reports


def _layer_report(index: int, score: float | None, sensitivity: dict[int, LayerSensitivity] | None,
                  result: DecomposedLayer | None, dense: int, dims: MoEDims) -> LayerReport:
    s = sensitivity.get(index) if sensitivity else None
    return LayerReport(
        layer=index, sensitivity=score, decomposed=result is not None,
        rank=result.spec.rank if result else None,
        num_banks=result.spec.num_banks if result else None,
        bank_map=result.spec.bank_map if result else None,
        routing_frequency=s.frequency.tolist() if s else None,
        principal_rank=s.principal_rank.tolist() if s else None,
        outlier_ratio=s.outlier_ratio.tolist() if s else None,
        relative_error=result.relative_error if result else None,
        params_dense=dense,
        params_compressed=decomposed_layer_params(result.spec, dims) if result else dense)


def _plugin_architectures(config: dict) -> list[str]:
    original = config.get("architectures") or []
    unknown = [a for a in original if a not in PLUGIN_ARCHITECTURES]
    if not original or unknown:
        raise OptionsError(f"architectures {original} of config.json have no MoE-SVD plugin class; "
                           f"supported: {sorted(PLUGIN_ARCHITECTURES)}")
    return [PLUGIN_ARCHITECTURES[a] for a in original]


def _moe_svd_block(model: LayerwiseModel, options: CompressionOptions, specs: dict[str, LayerSpec],
                   calib: CalibrationSet) -> MoESVDConfig:
    dims = model.dims
    dense = dense_layer_params(dims) * len(model.moe_layers)
    compressed = dense + sum(decomposed_layer_params(s, dims) - dense_layer_params(dims) for s in specs.values())
    block = MoESVDConfig(
        format_version=FORMAT_VERSION, method=options.method,
        original_architectures=list(model.raw_config.get("architectures") or []),
        layers=specs, params=ParamCounts(expert_dense=dense, expert_compressed=compressed),
        options=options.recorded(), calibration=calib.info)
    # round-trip through JSON and the strict reader: what we write is what the plugin accepts
    return MoESVDConfig.from_dict(json.loads(json.dumps(block.to_dict())))


def _summary(model: LayerwiseModel, options: CompressionOptions, plan: Plan, block: MoESVDConfig,
             calib: CalibrationSet) -> dict[str, Any]:
    return {
        "model_dir": str(model.model_dir), "model_type": model.model_type, "method": options.method,
        "target_ratio": options.ratio, "achieved_ratio": round(block.params.ratio, 6),
        "expert_params_dense": block.params.expert_dense,
        "expert_params_compressed": block.params.expert_compressed,
        "decomposed_layers": block.decomposed_layers, "ranks": {str(k): v for k, v in plan.ranks.items()},
        "calibration": dataclasses.asdict(calib.info), "options": options.recorded(),
    }
