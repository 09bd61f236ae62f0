"""The compressor's options: one typed dataclass, each field with its help text (`moesvd compress` is
generated from it by `moesvd_vllm.options`); recorded in the checkpoint as `moe_svd.options`.

Options left as None take the chosen method's default (the method classes in offline/methods/ declare
them): `selection`, `min_intermediate_fraction`, `trim_keep`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.safetensors_io import dtype_name
from moesvd_vllm.format.schema import BASIS_DTYPES, INTERMEDIATE_MULTIPLE
from moesvd_vllm.options import from_mapping, option
from moesvd_vllm.skipping import SkippingError
from offline.devices import DEVICE_CHOICES_HELP, check_device_spec
from offline.methods import CompressionMethod, method_class, method_names
from offline.skipping import SkipChoice, parse_skip_beta
from offline.sensitivity import RatioError

DEFAULT_METHOD = "moe-svd-stacked"
PROPAGATE = ("compressed", "dense")
SELECTIONS = ("sensitivity", "all")
OUTPUT_BASES = ("block", "experts")
DOWN_FITS = ("weights", "outputs")
TRIM_COMBINES = ("one", "sum")  # U-trimming: one kept bank (Algorithm 3) or Eq. 8's sum of the kept factors


class OptionsError(MoESVDError):
    """Invalid compression options."""


def _by_method(attribute: str) -> str:
    """'moe-svd-stacked 0.5, moe-svd 1.0, ...': each registered method's default of `attribute`."""
    return ", ".join(f"{name} {getattr(method_class(name), attribute)}" for name in method_names())


def _methods_help() -> str:
    return "; ".join(f"{name}: {method_class(name).summary}" for name in method_names())


@dataclass(frozen=True)
class CompressionOptions:
    """Everything `compress` needs besides the input and output directories (recorded in moe_svd.options)."""

    ratio: float = option(help="fraction of routed-expert parameters to remove, in (0, 1), e.g. 0.4")
    calib: str = option(help="calibration text: a .txt/.jsonl file, a directory of them, or a `datasets` "
                             "name (needs network)")
    method: str = option(DEFAULT_METHOD, _methods_help(), choices=method_names())
    num_samples: int = option(256, "calibration windows (paper: 256)")
    seq_len: int = option(2048, "tokens per calibration window (paper: 2048)")
    seed: int = option(0, "seed of the calibration sampling")
    batch_size: int = option(8, "calibration windows per forward batch")
    propagate: str = option("compressed", "outputs passed to the next layer: of the compressed layer "
                            "(sequential, as llm-compressor) or of the dense one", choices=PROPAGATE)
    selection: str | None = option(None, "'sensitivity' (selective decomposition, Eq. 4) or 'all' layers; "
                                   f"None: by method ({_by_method('selection')})", choices=SELECTIONS)
    outlier_tau: float = option(2.0, "tau of the activation-outlier ratio a_i (Eq. 10; Algorithm 1's default)")
    rank_threshold: float = option(0.01, "principal rank r_i: singular values above this times the largest "
                                   "(Algorithm 1)")
    # spreading a light target over all layers measured better than concentrating it (docs/results.md)
    min_kept_fraction: float = option(0.75, "plan: decompose few layers only while each keeps >= this share "
                                      "of its expert parameters")
    min_intermediate_fraction: float | None = option(
        None, "neuron selection (offline/slimming.py): reduce each expert's neurons first, down to this share "
        f"of I, then the rank (1: rank only); None: by method ({_by_method('min_intermediate_fraction')})")
    # 32 = the tile of vLLM's x86 fused-MoE kernel, which pads I' up to a multiple of 32 (resident bytes then
    # equal the checkpoint's count); 8 reaches finer ratios on small models at the cost of that padding
    intermediate_step: int = option(32, "kept neurons per expert in steps of this (32: no padding in vLLM's "
                                    f"x86 kernel; the format's minimum is {INTERMEDIATE_MULTIPLE})")
    ratio_tolerance: float = option(0.01, "allowed |achieved - requested| ratio")
    # bf16 bases run on AMX/AVX512-BF16 CPUs and GPUs natively (measured faster, docs/performance.md);
    # AVX2-only CPUs have no bf16 matmul
    basis_dtype: str = option("auto", "dtype of the shared bases: auto (the model's), float32 (AVX2-only "
                              "CPUs), bfloat16, float16", choices=("auto",) + tuple(BASIS_DTYPES))
    routing_weighted: bool = option(True, "weight each routed token's Gram contribution by its routing "
                                    "weight squared")
    output_basis: str = option("block", "moe-svd-stacked output basis: 'block' (PCA of the routed MoE output) "
                               "or 'experts' (of the experts' whitened down projections)", choices=OUTPUT_BASES)
    # "outputs": the down factor also compensates the error the compressed gate and up leave in the
    # intermediate activations (a sequential fit, offline/decompose.py fit_output_factor_to_outputs)
    down_fit: str = option("weights", "shared-basis methods: each expert's down factor D on the output basis B "
                           "from its 'weights' (D = B^T W_down) or from its 'outputs' (least squares of the dense "
                           "expert's output from the compressed gate/up's activations on its calibration tokens)",
                           choices=DOWN_FITS)
    trim_keep: int | None = option(None, "U-trimming (Eq. 7-8): experts kept per group; None: by method "
                                   f"({_by_method('trim_keep')}; None = no trimming)")
    # Eq. 8 as printed sums two kept experts' U Sigma into a new matrix per trimmed expert; the fused kernel
    # needs one matrix per expert (the activation is not linear), so served it stores every expert's bank
    trim_combine: str = option("one", "U-trimming: a trimmed expert is served by 'one' kept expert of its group "
                               "(the one that reproduces it best; shares its bank: Algorithm 3's mapping) or by "
                               "the 'sum' of its group's kept experts' factors (Eq. 8 as printed; stored as its "
                               "own bank, so it saves no memory when served)", choices=TRIM_COMBINES)
    trim_group_size: int = option(8, "U-trimming group size (App. D.4: DeepSeek's 64 experts in 8 groups)")
    # G > 1: E/G consecutive experts share their own bases (D.4); the server runs each routed pair in its
    # group's rank space (moesvd_vllm/grouped_bases.py); G = E gives every expert its own bases
    basis_groups: int = option(1, "shared bases per group of E/G consecutive experts (App. D.4's group-wise "
                               "V-sharing; 1: one pair of bases per layer, E: every expert its own); must "
                               "divide the expert count")
    prior_tokens: float = option(8.0, "per-expert Gram + this many tokens' worth of the layer's average Gram")
    damp: float = option(1e-4, "+ damp * mean(diag) * I on every per-expert Gram")
    baseline_rank_step: int = option(1, "rank granularity of the per-expert baselines")
    max_shard_bytes: int = option(2 * 1024**3, "largest output shard in bytes")
    device: str = option("auto", f"where layers, statistics and fits compute: {DEVICE_CHOICES_HELP}; under "
                         "torchrun `cuda` is each process's LOCAL_RANK GPU")
    force: bool = option(False, "replace an existing output directory (and discard a killed run's partial "
                         "output)")
    resume: bool = option(False, "continue a killed compression into the same --out from its first "
                          "unfinished layer (same input, options and process count)")
    skip_beta: str = option("none", "dynamic expert skipping (moesvd_vllm/skipping.py): 'none', 'median' (NAEE: "
                            "per layer the median of w2/w1 on the calibration data) or one beta in [0, 1] for "
                            "every layer; the server can override it (MOESVD_SKIP_BETA)", parse=parse_skip_beta,
                            exclusive="skip")
    skip_target: float | None = option(None, "dynamic expert skipping: per layer the beta that skips this share "
                                       "of the non-top-1 (token, expert) pairs on the calibration data, in [0, 1)",
                                       exclusive="skip")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionOptions:
        """From a mapping (e.g. a recorded `moe_svd.options`); unknown keys fail with the known ones."""
        return from_mapping(cls, data, error=OptionsError, what="compression option")

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise OptionsError(f"method {self.method!r} is not one of {method_names()}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise RatioError(f"compression ratio must be strictly between 0 and 1 (e.g. 0.4), got {self.ratio}")
        self._check_choices()
        check_device_spec(self.device)
        if self.force and self.resume:
            raise OptionsError("--force starts over and --resume continues a killed run: give one of them")
        fraction = self.min_intermediate_fraction
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise OptionsError(f"min_intermediate_fraction must be in (0, 1], got {fraction}")
        if fraction is not None and fraction < 1.0 and not self.method_class.supports_neuron_selection:
            raise OptionsError(f"min_intermediate_fraction < 1 (neuron selection) needs a shared-basis method, "
                               f"not {self.method!r}; the per-expert baselines reduce the rank only")
        if self.intermediate_step < 1 or self.intermediate_step % INTERMEDIATE_MULTIPLE:
            raise OptionsError(f"intermediate_step must be a positive multiple of {INTERMEDIATE_MULTIPLE} (the "
                               f"format's granularity), got {self.intermediate_step}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise OptionsError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
        if self.basis_groups < 1:
            raise OptionsError(f"basis_groups must be >= 1, got {self.basis_groups}")
        if self.trim_keep is not None and self.trim_keep < 1:
            raise OptionsError(f"trim_keep must be >= 1, got {self.trim_keep}")
        self.skip_choice  # a bad --skip-beta / --skip-target fails here
        if self.basis_groups != 1 and self.method_class.form != "shared_basis":
            raise OptionsError(f"basis_groups > 1 (group-wise bases) needs a shared-basis method, not "
                               f"{self.method!r}")
        for name in ("num_samples", "seq_len", "batch_size", "trim_group_size", "baseline_rank_step"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_choices(self) -> None:
        for name, allowed in (("propagate", PROPAGATE), ("output_basis", OUTPUT_BASES), ("down_fit", DOWN_FITS),
                              ("trim_combine", TRIM_COMBINES)):
            if getattr(self, name) not in allowed:
                raise OptionsError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise OptionsError(f"selection {self.selection!r} is not one of {SELECTIONS}")
        if self.basis_dtype != "auto" and self.basis_dtype not in BASIS_DTYPES:
            raise OptionsError(f"basis_dtype {self.basis_dtype!r} is not 'auto' or one of {BASIS_DTYPES}")

    # ----------------------------------------------------------------------------------- resolved values
    @property
    def skip_choice(self) -> SkipChoice:
        try:
            return SkipChoice(parse_skip_beta(self.skip_beta), self.skip_target)
        except SkippingError as error:
            raise OptionsError(str(error)) from None

    @property
    def method_class(self) -> type[CompressionMethod]:
        return method_class(self.method)

    def make_method(self) -> CompressionMethod:
        """The chosen method, configured with these options."""
        return self.method_class(self)

    @property
    def form(self) -> str:
        return self.method_class.form

    @property
    def effective_selection(self) -> str:
        return self.selection if self.selection is not None else self.method_class.selection

    @property
    def effective_min_intermediate_fraction(self) -> float:
        if self.min_intermediate_fraction is not None:
            return self.min_intermediate_fraction
        return self.method_class.min_intermediate_fraction

    @property
    def effective_trim_keep(self) -> int | None:
        return self.trim_keep if self.trim_keep is not None else self.method_class.trim_keep

    def basis_dtype_for(self, model_dtype: torch.dtype) -> str:
        """The stored dtype of the bases for a model whose expert weights are `model_dtype`."""
        return dtype_name(model_dtype) if self.basis_dtype == "auto" else self.basis_dtype

    def recorded(self) -> dict[str, Any]:
        """Options as stored in `moe_svd.options` (defaults resolved; no output-only flags)."""
        out = dataclasses.asdict(self)
        for key in ("force", "max_shard_bytes", "device", "resume"):
            out.pop(key)
        out["selection"] = self.effective_selection
        out["trim_keep"] = self.effective_trim_keep
        out["min_intermediate_fraction"] = self.effective_min_intermediate_fraction
        return out
