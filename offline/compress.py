"""MoE-SVD compression pipeline: `compress(model_dir, out_dir, options) -> Path`.

Stages (each timed, with its peak RSS, in report.md/json):
1. calibration data: tokenized and sampled (offline.calibration).
2. sensitivity pass (methods with selective decomposition): layer by layer, dense outputs passed on,
   collect f_i (Eq. 9), a_i (Eq. 10) and r_i; S_L (Eq. 4) per layer.
3. plan: which layers are decomposed and at which ranks, to meet the target ratio (offline.sensitivity).
4. decomposition pass: layer by layer, only one decoder layer in memory (in the checkpoint's dtype when
   it is bf16, else float32); for a planned layer keep its MoE inputs and router choices, then expert by
   expert form that expert's Grams, fit, hand its factors to the writer (spilled to disk) and, with
   `propagate="compressed"` (llm-compressor's sequential pipeline), write its reconstruction into the
   layer in place of the dense expert; pass the compressed (or dense) layer's outputs on.
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

import ctypes
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moesvd_vllm.architectures import MoEDims, moe_layout, require_servable

from moesvd_vllm.format.schema import (

    BASIS_DTYPES,

    INTERMEDIATE_MULTIPLE,

    RANK_MULTIPLE,

    LayerSpec,

    MoESVDConfig,

    decomposed_layer_params,

    dense_layer_params,

    expected_layer_tensors,

)
from offline import decompose as dec
from offline.calibration import CalibrationSet, ExpertStatistics, ExpertStatisticsHook, load_calibration
from moesvd_vllm.format.safetensors_io import check_output_dir
from moesvd_vllm.format.writer import COPIED, CompressedCheckpointWriter
from offline.checkpoint_io import expert_tensor_names
from offline.expert_tensors import (
    dtype_name,
    LayerExperts,
    torch_dtype,
)
from offline.layerwise import LayerInputs, LayerwiseModel
from offline.report import LayerReport, StageClock, write_reports
from offline.sensitivity import (
    LayerShape,
    Plan,
    RatioError,
    layer_sensitivity,
    monotone_levels,
    plan_decomposition,
    shape_levels,
)
from offline.slimming import slim_experts_in_place

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
    # plan: decompose few layers only while each keeps >= this share of its expert parameters (spreading a
    # light target over all layers measured better than concentrating it: docs/results.md)
    min_kept_fraction: float = 0.75
    # intermediate-neuron selection (offline/slimming.py): reduce each expert's neurons first, down to this
    # fraction of I, then the rank. None: the method's default (moe-svd-stacked 0.5; the paper's moe-svd
    # and the per-expert baselines 1.0 = rank only).
    min_intermediate_fraction: float | None = None
    # step of the kept neurons per expert: 32 = the tile of vLLM's x86 fused-MoE kernel, which pads I' up to
    # a multiple of 32 (resident bytes then equal the checkpoint's count); 8 (the format's minimum) reaches
    # finer ratios on small models at the cost of that padding when served on x86
    intermediate_step: int = 32
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
        fraction = self.min_intermediate_fraction
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise OptionsError(f"min_intermediate_fraction must be in (0, 1], got {fraction}")
        if fraction is not None and fraction < 1.0 and self.form != "shared_basis":
            raise OptionsError(f"min_intermediate_fraction < 1 (neuron selection) needs a shared-basis method, "
                               f"not {self.method!r}; the per-expert baselines reduce the rank only")
        if self.intermediate_step < 1 or self.intermediate_step % INTERMEDIATE_MULTIPLE:
            raise OptionsError(f"intermediate_step must be a positive multiple of {INTERMEDIATE_MULTIPLE} (the "
                               f"format's granularity), got {self.intermediate_step}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise OptionsError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
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
    def effective_min_intermediate_fraction(self) -> float:
        if self.min_intermediate_fraction is not None:
            return self.min_intermediate_fraction
        return 0.5 if self.method == "moe-svd-stacked" else 1.0

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
        out["min_intermediate_fraction"] = self.effective_min_intermediate_fraction
        return out


# ------------------------------------------------------------------------------------------ helpers
def _num_banks(num_experts: int, keep: int | None, group_size: int) -> int:
    if keep is None:
        return num_experts
    return sum(min(keep, min(group_size, num_experts - s)) for s in range(0, num_experts, group_size))


def _counting_spec(options: CompressionOptions, dims: MoEDims, shape: LayerShape) -> LayerSpec:
    """A spec with the right parameter count for `shape` (placeholder bank map with the planned K banks;
    the basis dtype does not change the count)."""
    banks = _num_banks(dims.num_experts, options.effective_trim_keep, options.trim_group_size)
    bank_map = [min(e, banks - 1) for e in range(dims.num_experts)]
    intermediate = None if shape.intermediate == dims.intermediate else shape.intermediate
    return LayerSpec(form=options.form, rank=shape.rank, num_experts=dims.num_experts, bank_map=bank_map,
                     intermediate=intermediate, bases=shape.bases)


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


_TRIM_EVERY_EXPERTS = 8


def _release_free_heap() -> None:
    """Give free heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere). The per-expert
    temporaries vary in size with each expert's routed tokens; glibc keeps the freed holes resident,
    measured +1 GB over the 128 experts of a Qwen3-30B-A3B layer without this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _collect(model: LayerwiseModel, layer, index: int, stream: _Stream, collect_grams: bool,
             desc: str, routing_weighted: bool = False) -> tuple[ExpertStatistics, list[torch.Tensor]]:
    dims = model.dims
    stats = ExpertStatistics(dims.num_experts, dims.hidden, dims.intermediate, collect_grams=collect_grams,
                             routing_weighted=routing_weighted)
    experts = model.moe_block(layer).experts
    hook = ExpertStatisticsHook(stats, experts)
    # after each batch: the per-expert temporaries of the forward and the hook vary in size
    trim = experts.register_forward_hook(lambda *_: _release_free_heap())
    try:
        outputs = _run(model, layer, index, stream, hook, desc)
    finally:
        hook.remove()
        trim.remove()
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
            ranks = _principal_ranks(layer_experts(model, layer), options.rank_threshold)
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
    candidates = shape_levels(hidden=dims.hidden, intermediate=dims.intermediate, rank_step=step,
                              max_rank=max_rank, intermediate_step=options.intermediate_step,
                              min_intermediate_fraction=options.effective_min_intermediate_fraction)

    def layer_params(shape: LayerShape) -> int:
        return decomposed_layer_params(_counting_spec(options, dims, shape), dims)

    dense = dense_layer_params(dims)
    return plan_decomposition(
        scores, options.ratio, dense_layer=dense, levels=monotone_levels(candidates, layer_params, dense),
        layer_params=layer_params, tolerance=options.ratio_tolerance,
        min_kept_fraction=options.min_kept_fraction, decompose_all=options.effective_selection == "all")


# ------------------------------------------------------------------------------------------ stage 4
@dataclass
class DecomposedLayer:
    spec: LayerSpec
    written: dict[str, tuple[tuple[int, ...], str]]  # on-disk name -> (shape, stored dtype), as emitted
    relative_error: dict[str, float]


class _TensorSink:
    """Hands each tensor of a decomposed layer on as soon as it exists (to the writer, which spills it to
    disk) and remembers its shape and dtype for the schema check: the layer's factors are never all
    in memory."""

    def __init__(self, add: Callable[[str, torch.Tensor], None]):
        self._add = add
        self.written: dict[str, tuple[tuple[int, ...], str]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.written[name] = (tuple(tensor.shape), dtype_name(tensor.dtype))
        self._add(name, tensor)


def layer_experts(model: LayerwiseModel, layer) -> LayerExperts:
    """Views of the built layer's routed experts (gate/up [E, I, H], down [E, H, I], compute dtype):
    no second copy of the expert weights. The compute dtype holds the stored values exactly (float32,
    or the checkpoint's own bfloat16)."""
    experts = model.moe_block(layer).experts
    gate_up = experts.gate_up_proj.data
    inter = model.dims.intermediate
    return LayerExperts(gate_up[:, :inter], gate_up[:, inter:], experts.down_proj.data, [])


class _ExpertGrams:
    """Per-expert Grams formed at the point of use, each with a small prior from the layer-wide average
    (`prior_tokens` tokens of it) and `damp` * mean(diag) on the diagonal; one expert's at a time."""

    def __init__(self, stats: ExpertStatistics, options: CompressionOptions):
        self.stats, self.options = stats, options
        self.in_prior = stats.gram_layer / max(stats.total_tokens, 1)
        self.mid_prior = stats.gram_mid_sum / max(int(stats.routed_tokens.sum()), 1)

    def _regularized(self, gram: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return dec.regularized_gram(gram, prior, self.options.prior_tokens, self.options.damp, in_place=True)

    def input(self, expert: int) -> torch.Tensor:
        return self._regularized(self.stats.input_gram(expert), self.in_prior)

    def mid(self, expert: int) -> torch.Tensor:
        return self._regularized(self.stats.mid_gram(expert), self.mid_prior)


class _ErrorSums:
    """The report's relative_error: sum_e ||(W_e - W'_e) X_e^T||^2 / sum_e ||W_e X_e^T||^2 per projection."""

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0.0] for name in ("gate", "up", "down")}

    def add(self, parts: dict[str, tuple[float, float]]) -> None:
        for name, (num, den) in parts.items():
            self.sums[name][0] += num
            self.sums[name][1] += den

    def relative(self) -> dict[str, float]:
        # the fit's error terms can round a zero error to about -1e-17: clamp at zero
        return {name: max(num, 0.0) / den if den > 0 else 0.0 for name, (num, den) in self.sums.items()}


def _write_expert(layer, model: LayerwiseModel, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Make the in-memory layer's expert compute what the compressed checkpoint computes for it."""
    experts = model.moe_block(layer).experts
    with torch.no_grad():
        experts.gate_up_proj.data[expert].copy_(gate_up)
        experts.down_proj.data[expert].copy_(down)


def _reconstruct(factor: torch.Tensor, basis: torch.Tensor | None, dtype: torch.dtype,
                 basis_first: bool = False) -> torch.Tensor:
    """factor @ basis (or basis @ factor) in `dtype`: a float32 GEMM of the stored (exact in float32)
    values unless the layer computes in float64. No basis (a layer without bases): the factor itself."""
    if basis is None:
        return factor.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    f, b = factor.to(work), basis.to(work)
    return (b @ f if basis_first else f @ b).to(dtype)


@dataclass
class _SharedFactors:
    """One expert's stored factors: [gate; up] G [2I, r] and down D [r, I] (model dtype)."""

    gate_up: torch.Tensor
    down: torch.Tensor


def _shared_bases(model: LayerwiseModel, index: int, experts: LayerExperts, stats: ExpertStatistics,
                  grams: _ExpertGrams, rank: int, options: CompressionOptions
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    where, num_experts = f"layer {index}", model.dims.num_experts
    if options.method == "moe-svd-stacked":
        in_weights = (torch.cat([experts.gate[e], experts.up[e]]) for e in range(num_experts))
        basis_in = dec.stacked_input_basis(in_weights, stats.routed_tokens.double(), stats.gram_layer,
                                           rank, where)
        if options.output_basis == "block":
            basis_out = dec.block_output_basis(stats.gram_out, rank)
        else:  # one expert's intermediate Gram alive at a time
            basis_out = dec.stacked_output_basis(experts.down, (grams.mid(e) for e in range(num_experts)), rank)
        return basis_in, basis_out
    top = int(torch.argmax(stats.routed_tokens))  # "moe-svd": the most frequent expert's bases (Eq. 5)
    return dec.most_frequent_expert_bases(torch.cat([experts.gate[top], experts.up[top]]), experts.down[top],
                                          grams.input(top), grams.mid(top), rank, where)


def _shared_error_parts(fit: dec.InputFit, down_weight: torch.Tensor, mid_gram: torch.Tensor,
                        factors: _SharedFactors, basis_out: torch.Tensor | None, inter: int
                        ) -> dict[str, tuple[float, float]]:
    """Whitened errors of one expert's dense weights against `factors` (its own, or under U-trimming a
    kept expert's): gate and up from the fit's terms, down directly (B D is [H, I])."""
    down = factors.down.double() if basis_out is None else basis_out @ factors.down.double()
    return {"gate": fit.error(factors.gate_up[:inter], slice(0, inter)),
            "up": fit.error(factors.gate_up[inter:], slice(inter, None)),
            "down": dec.whitened_error(down_weight, down, mid_gram)}


def _release_heap_every_few_experts(expert: int) -> None:
    """Called once per expert in the per-expert loops (see `_release_free_heap`)."""
    if expert % _TRIM_EVERY_EXPERTS == 0:
        _release_free_heap()


def _shared_basis_layer(model: LayerwiseModel, index: int, layer, stats: ExpertStatistics,
                        shape: LayerShape, options: CompressionOptions, sensitivity: float | None,
                        write_back: bool, emit: _TensorSink) -> DecomposedLayer:
    """Neuron selection (when the shape keeps fewer than I neurons, offline/slimming.py), shared bases,
    then expert by expert (one expert's Grams alive at a time): fit, error terms, and, with `write_back`,
    the reconstruction written into `layer` in place of the dense expert. Under U-trimming a group's kept
    experts go first, so each trimmed expert meets the kept ones it chooses from (Eq. 7-8)."""
    dims, num_experts, inter = model.dims, model.dims.num_experts, model.dims.intermediate
    experts = layer_experts(model, layer)
    grams = _ExpertGrams(stats, options)
    neurons = [torch.arange(inter)] * num_experts
    slimming_error = None
    if shape.intermediate < inter:  # rewrites the layer's experts in place; the stages below fit those
        slimming = slim_experts_in_place(experts.gate, experts.up, experts.down, grams.mid, shape.intermediate,
                                         after_expert=_release_heap_every_few_experts)
        neurons, slimming_error = slimming.kept, slimming.error
        logger.info("layer %d: kept %d of %d neurons per expert, relative down error %.4g",
                    index, shape.intermediate, inter, slimming_error)
    model_dtype = torch_dtype(model.expert_dtype())
    basis_dtype_name = options.basis_dtype_for(model_dtype)
    basis_dtype = torch_dtype(basis_dtype_name)
    layout = moe_layout(model.model_type)
    prefix = f"model.layers.{index}.{layout.moe_module}"
    if shape.bases:
        basis_in, basis_out = _shared_bases(model, index, experts, stats, grams, shape.rank, options)
        # the stored (rounded) bases are what the server multiplies with: fit the factors against them
        basis_in = basis_in.to(basis_dtype).double()
        basis_out = basis_out.to(basis_dtype).double()
        emit(f"{prefix}.moe_svd_in.weight", basis_in.to(basis_dtype))
        emit(f"{prefix}.moe_svd_out.weight", basis_out.to(basis_dtype))
    else:  # r = H without bases: the factors are the (slimmed) expert weights themselves
        basis_in = basis_out = None

    keep = options.effective_trim_keep
    trimming = keep is not None and keep < min(options.trim_group_size, num_experts)
    groups = (dec.trimming_groups(num_experts, options.trim_group_size) if trimming
              else [[e] for e in range(num_experts)])
    kept_by_group = [dec.kept_in_group(stats.frequency, g, keep) if trimming else g for g in groups]
    bank_of = {e: bank for bank, e in enumerate(sorted(e for kept in kept_by_group for e in kept))}
    source = list(range(num_experts))  # the expert whose factors serve each expert
    errors = _ErrorSums()
    for group, kept in zip(groups, kept_by_group):
        factors: dict[int, _SharedFactors] = {}  # the group's kept experts
        for e in kept + [e for e in group if e not in kept]:
            _release_heap_every_few_experts(e)
            gate_up = torch.cat([experts.gate[e], experts.up[e]])
            fit = (dec.identity_fit(gate_up, grams.input(e)) if basis_in is None
                   else dec.fit_input(gate_up, basis_in, grams.input(e)))
            mid_gram = grams.mid(e)
            down = experts.down[e] if basis_out is None else dec.fit_output_factor(experts.down[e], basis_out)
            own = _SharedFactors(fit.factor.to(model_dtype), down.to(model_dtype))
            candidates = {e: own} if e in kept else {k: factors[k] for k in kept}
            parts = {k: _shared_error_parts(fit, experts.down[e], mid_gram, f, basis_out, inter)
                     for k, f in candidates.items()}
            # U-trimming: the kept expert that reproduces e best (whitened distance, Eq. 8)
            source[e] = min(parts, key=lambda k: (sum(num for num, _ in parts[k].values()), k))
            errors.add(parts[source[e]])
            if e in kept:
                factors[e] = own
                bank, rows = f"{prefix}.experts.{bank_of[e]}", neurons[e]  # only the kept neurons
                emit(f"{bank}.{layout.gate_proj}.weight", own.gate_up[:inter][rows].contiguous())
                emit(f"{bank}.{layout.up_proj}.weight", own.gate_up[inter:][rows].contiguous())
                emit(f"{bank}.{layout.down_proj}.weight", own.down[:, rows].contiguous())
            if write_back:
                chosen = factors[source[e]]
                _write_expert(layer, model, e, _reconstruct(chosen.gate_up, basis_in, experts.gate.dtype),
                              _reconstruct(chosen.down, basis_out, experts.gate.dtype, basis_first=True))
            del fit, mid_gram
    bank_map = [bank_of[source[e]] for e in range(num_experts)]
    spec = LayerSpec(form="shared_basis", rank=shape.rank, num_experts=num_experts, bank_map=bank_map,
                     basis_dtype=basis_dtype_name, sensitivity=sensitivity,
                     intermediate=shape.intermediate if shape.intermediate < inter else None, bases=shape.bases)
    relative = errors.relative()
    if slimming_error is not None:
        relative["slimming"] = slimming_error
    return DecomposedLayer(spec, emit.written, relative)


def _per_expert_layer(model: LayerwiseModel, index: int, layer, stats: ExpertStatistics, rank: int,
                      options: CompressionOptions, sensitivity: float | None, write_back: bool,
                      emit: _TensorSink) -> DecomposedLayer:
    dims, where = model.dims, f"layer {index}"
    experts = layer_experts(model, layer)
    grams = _ExpertGrams(stats, options)
    whitened = options.method == "whitened-svd"
    layout = moe_layout(model.model_type)
    prefix = f"model.layers.{index}.{layout.moe_module}"
    model_dtype = torch_dtype(model.expert_dtype())
    errors = _ErrorSums()
    for e in range(dims.num_experts):
        _release_heap_every_few_experts(e)
        gram_in, gram_mid = grams.input(e), grams.mid(e)
        s_in = dec.whitening_factor(gram_in, f"{where} expert {e} input") if whitened else None
        s_mid = dec.whitening_factor(gram_mid, f"{where} expert {e} down input") if whitened else None
        approx = {}
        for key, proj, weight, s, gram in (("gate", layout.gate_proj, experts.gate[e], s_in, gram_in),
                                           ("up", layout.up_proj, experts.up[e], s_in, gram_in),
                                           ("down", layout.down_proj, experts.down[e], s_mid, gram_mid)):
            low = dec.truncated_svd(weight, rank, s)
            a, b = low.a.to(model_dtype), low.b.to(model_dtype)
            emit(f"{prefix}.experts.{e}.{proj}.lora_a", a)
            emit(f"{prefix}.experts.{e}.{proj}.lora_b", b)
            approx[key] = b.double() @ a.double()
            errors.add({key: dec.whitened_error(weight, approx[key], gram)})
        if write_back:
            dtype = experts.gate.dtype
            _write_expert(layer, model, e, torch.cat([approx["gate"], approx["up"]]).to(dtype),
                          approx["down"].to(dtype))
    spec = LayerSpec(form="per_expert", rank=rank, num_experts=dims.num_experts,
                     bank_map=list(range(dims.num_experts)), sensitivity=sensitivity)  # no bases
    return DecomposedLayer(spec, emit.written, errors.relative())


def decompose_layer(model: LayerwiseModel, index: int, layer, stats: ExpertStatistics, shape: LayerShape,
                    options: CompressionOptions, sensitivity: float | None,
                    add: Callable[[str, torch.Tensor], None], write_back: bool = False) -> DecomposedLayer:
    """Decompose the routed experts of the built `layer` (its weights are the dense ones), handing each
    written tensor to `add` as soon as it exists. With `write_back` each expert's weights in `layer` are
    replaced by what the compressed checkpoint computes (propagate="compressed"), after its Grams."""
    sink = _TensorSink(add)
    if options.form == "shared_basis":
        result = _shared_basis_layer(model, index, layer, stats, shape, options, sensitivity, write_back, sink)
    else:
        result = _per_expert_layer(model, index, layer, stats, shape.rank, options, sensitivity, write_back,
                                   sink)
    expected = expected_layer_tensors(model.model_type, index, result.spec, model.dims, model.expert_dtype())
    got = result.written
    if got != expected:  # a bug in this module, never a user error
        raise AssertionError(f"layer {index}: written tensors differ from the schema: "
                             f"{sorted(set(got) ^ set(expected))[:4]} ...")
    return result


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
