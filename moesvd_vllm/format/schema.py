"""The compressed-checkpoint schema: the one contract between `offline/` (writer) and the plugin (reader).

A compressed checkpoint is a Hugging Face directory whose `config.json` keeps the original `model_type`,
names a plugin-only architecture in `architectures`, and carries a `moe_svd` block described here.
See docs/format.md for the full description. Pure Python (no torch, no vLLM): cheap to import anywhere.

Shapes of a decomposed MoE layer `L` in the "shared_basis" form (H hidden, I expert intermediate,
r rank, K banks = distinct factor sets, E routed experts), shown for Qwen-style names; MOE_LAYOUTS gives
each model type's MoE module (`mlp` / `block_sparse_moe`) and expert projection names (w1/w3/w2 ...):

    model.layers.L.mlp.moe_svd_in.weight            [r, H]   input basis A, shared by all gate/up
    model.layers.L.mlp.moe_svd_out.weight           [H, r]   output basis B, shared by all down
    model.layers.L.mlp.experts.k.gate_proj.weight   [I, r]   per-bank factors, k in [0, K)
    model.layers.L.mlp.experts.k.up_proj.weight     [I, r]
    model.layers.L.mlp.experts.k.down_proj.weight   [r, I]

Expert e of the original model computes  B @ down_k(act(gate_k(A x)) * up_k(A x))  with k = bank_map[e].
Two optional reductions (format version 2): `intermediate` I' < I keeps I' intermediate neurons per bank
(the factors are [I', r] and [r, I']; which neurons were kept is folded into the factors), and
`bases: false` (only with r = H) stores no bases: A and B are the identity and the factors are [I', H] /
[H, I'] (a layer reduced by intermediate-neuron selection alone).
Format version 4 adds `basis_groups` G (default 1): the experts form G groups of E/G consecutive experts,
each with its own bases (App. D.4's group-wise V-sharing; G = E gives every expert its own). The bases
of all groups are stored stacked, group g in rows / columns [g r, (g + 1) r):

    model.layers.L.mlp.moe_svd_in.weight            [G r, H]
    model.layers.L.mlp.moe_svd_out.weight           [H, G r]

and expert e of group g = e // (E / G) computes B_g @ down_k(act(gate_k(A_g x)) * up_k(A_g x)); every
expert of a bank lies in the bank's group (its factors were fitted against that group's bases).
The router (`mlp.gate`) and everything else keeps the original names and shapes. The "per_expert" form
(baselines: plain / whitened per-expert SVD) stores `experts.e.{gate,up,down}_proj.{lora_a,lora_b}` with
W ~= lora_b @ lora_a; only the PyTorch reference evaluates it, the plugin refuses it. The "shared_core"
form (offline/shared_core.py, seed 001) stores per projection one core C shared by the layer's experts,
`moe_svd_core.{gate,up,down}_proj.weight` ([I, H], [I, H], [H, I]), and per expert low-rank wrappers
`experts.e.{proj}.{in_u,in_v}` [d_in, r] and `.{out_u,out_v}` [d_out, r] with
W_e ~= (1 + out_u out_v^T) C (1 + in_u in_v^T); offline only as well (the plugin refuses it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from moesvd_vllm.architectures import MoEDims, moe_layout
from moesvd_vllm.errors import SchemaError

FORMAT_VERSION = 2  # 2 added LayerSpec.intermediate and LayerSpec.bases
SKIPPING_FORMAT_VERSION = 3  # 3 added the optional `skipping` block (written only when present)
BASIS_GROUPS_FORMAT_VERSION = 4  # 4 added LayerSpec.basis_groups (written only when some layer has G > 1)
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)
CONFIG_KEY = "moe_svd"
RANK_MULTIPLE = 32  # vLLM's CPU fused-MoE kernel needs the expert hidden size (here: r) % 32 == 0
INTERMEDIATE_MULTIPLE = 8  # kept intermediate neurons per expert: a multiple of this (vLLM pads to its tiles)

FORMS = ("shared_basis", "per_expert", "shared_core")
BETA_SELECTIONS = ("median_ratio", "target_fraction", "fixed")
BASIS_DTYPES = ("float32", "bfloat16", "float16")


def _from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown and missing keys with the path in the message."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    required = {
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise SchemaError(f"{where}: missing key(s) {missing}")
    return cls(**data)


@dataclass(frozen=True)
class LayerSpec:
    """One decomposed MoE layer."""

    form: str  # "shared_basis" (servable), "per_expert" (baselines) or "shared_core" (offline)
    rank: int  # r: columns of the rank space (shared_basis: a multiple of RANK_MULTIPLE)
    num_experts: int  # E: routed experts of the original layer
    bank_map: list[int]  # expert e -> bank k (identity when nothing was trimmed)
    basis_dtype: str = "float32"  # dtype of moe_svd_in / moe_svd_out (shared_basis only)
    sensitivity: float | None = None  # S_L (Eq. 4) of this layer, for the report
    intermediate: int | None = None  # I': intermediate neurons kept per bank (None: the model's I)
    bases: bool = True  # False: no moe_svd_in/out (A = B = identity; needs rank == hidden)
    basis_groups: int = 1  # G: groups of E/G consecutive experts with their own bases (format version 4)

    def kept_intermediate(self, dims: "MoEDims") -> int:
        return dims.intermediate if self.intermediate is None else self.intermediate

    @property
    def num_banks(self) -> int:
        return max(self.bank_map) + 1 if self.bank_map else 0

    def group_of_expert(self, expert: int) -> int:
        """The basis group of expert `expert` (groups of E/G consecutive experts)."""
        return expert // (self.num_experts // self.basis_groups)

    def group_of_bank(self) -> list[int]:
        """The basis group of every bank (the group of the experts it serves; `validate` checks they agree)."""
        groups = [0] * self.num_banks
        for expert, bank in enumerate(self.bank_map):
            groups[bank] = self.group_of_expert(expert)
        return groups

    def _validate_groups(self, where: str) -> None:
        groups = self.basis_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise SchemaError(f"{where}.basis_groups: must be a positive integer, got {groups!r}")
        if groups == 1:
            return
        if self.form != "shared_basis" or not self.bases:
            raise SchemaError(f"{where}.basis_groups: {groups} groups of bases need the shared_basis form with "
                              "bases (bases: true)")
        if self.num_experts % groups:
            raise SchemaError(f"{where}.basis_groups: {self.num_experts} experts do not split into {groups} "
                              "equal groups; re-compress with a group count that divides the expert count")
        bank_group = self.group_of_bank()
        for expert, bank in enumerate(self.bank_map):
            if bank_group[bank] != self.group_of_expert(expert):
                raise SchemaError(
                    f"{where}.bank_map: bank {bank} serves experts of basis groups {bank_group[bank]} and "
                    f"{self.group_of_expert(expert)} (expert {expert}); a bank's factors belong to one group's "
                    "bases. Re-create the checkpoint with `moesvd compress`")

    def validate(self, where: str) -> None:
        if self.form not in FORMS:
            raise SchemaError(f"{where}.form: {self.form!r} is not one of {FORMS}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise SchemaError(f"{where}.rank: must be a positive integer, got {self.rank!r}")
        if self.form == "shared_basis" and self.rank % RANK_MULTIPLE:
            raise SchemaError(
                f"{where}.rank: {self.rank} is not a multiple of {RANK_MULTIPLE} "
                "(vLLM's fused-MoE kernel needs it); re-compress with a rank multiple of 32")
        if len(self.bank_map) != self.num_experts:
            raise SchemaError(
                f"{where}.bank_map: has {len(self.bank_map)} entries for {self.num_experts} experts")
        banks = set(self.bank_map)
        if any((not isinstance(k, int)) or k < 0 for k in banks) or banks != set(range(len(banks))):
            raise SchemaError(
                f"{where}.bank_map: banks must be the integers 0..K-1 each used at least once, got "
                f"{sorted(banks)}")
        if self.form != "shared_basis" and self.bank_map != list(range(self.num_experts)):
            raise SchemaError(f"{where}.bank_map: the {self.form} form has no banks (identity map)")
        if self.basis_dtype not in BASIS_DTYPES:
            raise SchemaError(f"{where}.basis_dtype: {self.basis_dtype!r} is not one of {BASIS_DTYPES}")
        if self.intermediate is not None and (
                not isinstance(self.intermediate, int) or self.intermediate <= 0
                or self.intermediate % INTERMEDIATE_MULTIPLE):
            raise SchemaError(f"{where}.intermediate: must be a positive multiple of {INTERMEDIATE_MULTIPLE} "
                              f"or null, got {self.intermediate!r}")
        if not isinstance(self.bases, bool) or (self.form != "shared_basis" and not self.bases):
            raise SchemaError(f"{where}.bases: must be true or false (false only for the shared_basis form)")
        if self.form != "shared_basis" and self.intermediate is not None:
            raise SchemaError(f"{where}.intermediate: the {self.form} form keeps every intermediate neuron")
        self._validate_groups(where)

    def validate_dims(self, dims: "MoEDims", where: str) -> None:
        """Checks that need the model's dimensions (the reader calls this with config.json's dims)."""
        if self.kept_intermediate(dims) > dims.intermediate:
            raise SchemaError(f"{where}.intermediate: {self.intermediate} exceeds the model's expert "
                              f"intermediate size {dims.intermediate}")
        if self.form == "shared_basis" and self.rank > dims.hidden:
            raise SchemaError(f"{where}.rank: {self.rank} exceeds the hidden size {dims.hidden}")
        if not self.bases and self.rank != dims.hidden:
            raise SchemaError(f"{where}.bases: false needs rank == hidden size {dims.hidden}, got rank "
                              f"{self.rank}")


@dataclass(frozen=True)
class ParamCounts:
    """Routed-expert parameters (gate/up/down of all MoE layers; shared bases count as expert params)."""

    expert_dense: int
    expert_compressed: int

    @property
    def ratio(self) -> float:
        """Fraction of expert parameters removed (the paper's compression ratio)."""
        return 1.0 - self.expert_compressed / self.expert_dense


@dataclass(frozen=True)
class CalibrationInfo:
    source: str  # what the user passed (path or dataset name)
    sha256: str  # hash of the token ids actually used
    num_samples: int
    seq_len: int
    seed: int


@dataclass(frozen=True)
class SkippingSpec:
    """Dynamic expert skipping (moesvd_vllm/skipping.py): per MoE layer, a token keeps its top-1 expert and
    every other chosen expert whose routing weight is >= beta x the top-1 weight."""

    betas: dict[str, float]  # MoE layer index (string) -> beta in [0, 1]; every MoE layer, no other
    selection: str  # how the compressor chose them: BETA_SELECTIONS
    target_skip_fraction: float | None = None  # selection "target_fraction": the requested share
    calibration_skip_fraction: dict[str, float] | None = None  # measured share of non-top-1 pairs skipped

    def validate(self, where: str) -> None:
        fix = ("re-run the compressor with --skip-beta in [0, 1] or --skip-target in [0, 1), or override at "
               "server start with MOESVD_SKIP_BETA (docs/format.md)")
        if self.selection not in BETA_SELECTIONS:
            raise SchemaError(f"{where}.selection: {self.selection!r} is not one of {BETA_SELECTIONS}")
        if not isinstance(self.betas, dict) or not self.betas:
            raise SchemaError(f"{where}.betas: expected an object {{layer index: beta}}; {fix}")
        for key, beta in self.betas.items():
            if not str(key).isdigit():
                raise SchemaError(f"{where}.betas: key {key!r} is not a layer index; {fix}")
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
                raise SchemaError(
                    f"{where}.betas.{key}: beta must be a number in [0, 1] (0 keeps every chosen expert, 1 only "
                    f"the top-1), got {beta!r}; {fix}")
        target = self.target_skip_fraction
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0.0 <= target < 1.0):
            raise SchemaError(f"{where}.target_skip_fraction: must be in [0, 1) or null, got {target!r}")

    def validate_layers(self, moe_layers: list[int], where: str) -> None:
        """One beta per MoE layer of the model (the reader calls this with config.json's MoE layers)."""
        have, want = sorted(int(k) for k in self.betas), sorted(moe_layers)
        if have != want:
            raise SchemaError(
                f"{where}.betas: {len(have)} beta(s) for layers {have}, but the model's MoE layers are {want} "
                f"({len(want)}); the block belongs to another model or was edited. Re-run the compressor on "
                "this model, or give one beta per MoE layer")


@dataclass(frozen=True)
class MoESVDConfig:
    """The `moe_svd` block of a compressed checkpoint's config.json."""

    format_version: int
    method: str  # e.g. "moe-svd", "moe-svd-stacked", "svd", "whitened-svd", "full-rank"
    original_architectures: list[str]
    layers: dict[str, LayerSpec]  # key: decoder layer index as a string (JSON keys are strings)
    params: ParamCounts
    options: dict[str, Any] = field(default_factory=dict)  # the compressor's options, as run
    calibration: CalibrationInfo | None = None
    skipping: SkippingSpec | None = None  # format version 3

    @classmethod
    def from_dict(cls, data: Any) -> "MoESVDConfig":
        where = CONFIG_KEY
        if isinstance(data, dict) and data.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise SchemaError(
                f"{where}.format_version: {data.get('format_version')!r} is not supported by this "
                f"moesvd-vllm (reads versions {list(READABLE_FORMAT_VERSIONS)}); upgrade moesvd-vllm or "
                "re-compress")
        cfg = _from_dict(cls, data, where)
        layers = {}
        if not isinstance(cfg.layers, dict):
            raise SchemaError(f"{where}.layers: expected an object keyed by layer index")
        for key, spec in cfg.layers.items():
            if not str(key).isdigit():
                raise SchemaError(f"{where}.layers: key {key!r} is not a layer index")
            layers[str(int(key))] = _from_dict(LayerSpec, spec, f"{where}.layers.{key}")
        params = _from_dict(ParamCounts, cfg.params, f"{where}.params")
        calib = (None if cfg.calibration is None
                 else _from_dict(CalibrationInfo, cfg.calibration, f"{where}.calibration"))
        skipping = (None if cfg.skipping is None
                    else _from_dict(SkippingSpec, cfg.skipping, f"{where}.skipping"))
        if skipping is not None:
            skipping = dataclasses.replace(skipping, betas={str(k): v for k, v in skipping.betas.items()}
                                           if isinstance(skipping.betas, dict) else skipping.betas)
        out = dataclasses.replace(cfg, layers=layers, params=params, calibration=calib, skipping=skipping)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for spec in out["layers"].values():  # G = 1 is not written: readers before version 4 read the block
            if spec.get("basis_groups") == 1:
                del spec["basis_groups"]
        return out

    def validate(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise SchemaError(f"{CONFIG_KEY}.method: must be a non-empty string")
        if not self.original_architectures:
            raise SchemaError(f"{CONFIG_KEY}.original_architectures: must name the original class")
        for key, spec in self.layers.items():
            spec.validate(f"{CONFIG_KEY}.layers.{key}")
        if self.skipping is not None:
            if self.format_version < SKIPPING_FORMAT_VERSION:
                raise SchemaError(f"{CONFIG_KEY}.skipping: needs format_version >= {SKIPPING_FORMAT_VERSION}, "
                                  f"the block says {self.format_version}")
            self.skipping.validate(f"{CONFIG_KEY}.skipping")
        grouped = [key for key, spec in self.layers.items() if spec.basis_groups != 1]
        if grouped and self.format_version < BASIS_GROUPS_FORMAT_VERSION:
            raise SchemaError(f"{CONFIG_KEY}.layers.{grouped[0]}.basis_groups: needs format_version >= "
                              f"{BASIS_GROUPS_FORMAT_VERSION}, the block says {self.format_version}")
        p = self.params
        if not (0 < p.expert_compressed and 0 < p.expert_dense):
            raise SchemaError(f"{CONFIG_KEY}.params: counts must be positive, got {p}")

    @property
    def decomposed_layers(self) -> list[int]:
        return sorted(int(k) for k in self.layers)

    def layer(self, index: int) -> LayerSpec | None:
        return self.layers.get(str(index))


def expected_layer_tensors(model_type: str, layer_index: int, spec: LayerSpec, dims: MoEDims,
                           model_dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every expert tensor a decomposed layer stores (router excluded)."""
    spec.validate_dims(dims, f"{CONFIG_KEY}.layers.{layer_index}")
    layout = moe_layout(model_type)
    prefix = f"model.layers.{layer_index}.{layout.moe_module}"
    projections = ((layout.gate_proj, "in"), (layout.up_proj, "in"), (layout.down_proj, "out"))
    r, h, i = spec.rank, dims.hidden, spec.kept_intermediate(dims)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    if spec.form == "shared_basis":
        if spec.bases:
            g = spec.basis_groups
            out[f"{prefix}.moe_svd_in.weight"] = ((g * r, h), spec.basis_dtype)
            out[f"{prefix}.moe_svd_out.weight"] = ((h, g * r), spec.basis_dtype)
        for k in range(spec.num_banks):
            for name, side in projections:
                shape = (i, r) if side == "in" else (r, i)
                out[f"{prefix}.experts.{k}.{name}.weight"] = (shape, model_dtype)
    elif spec.form == "shared_core":
        for name, side in projections:
            out[f"{prefix}.moe_svd_core.{name}.weight"] = ((i, h) if side == "in" else (h, i), model_dtype)
        for e in range(spec.num_experts):
            for name, side in projections:
                d_out, d_in = (i, h) if side == "in" else (h, i)
                for factor, rows in (("in_u", d_in), ("in_v", d_in), ("out_u", d_out), ("out_v", d_out)):
                    out[f"{prefix}.experts.{e}.{name}.{factor}"] = ((rows, r), model_dtype)
    else:
        for e in range(spec.num_experts):
            for name, side in projections:
                rows, cols = (i, h) if side == "in" else (h, i)
                out[f"{prefix}.experts.{e}.{name}.lora_a"] = ((r, cols), model_dtype)
                out[f"{prefix}.experts.{e}.{name}.lora_b"] = ((rows, r), model_dtype)
    return out


def decomposed_layer_params(spec: LayerSpec, dims: MoEDims) -> int:
    """Expert parameters of a decomposed layer (bases + factors), as counted in ParamCounts."""
    r, h, i = spec.rank, dims.hidden, spec.kept_intermediate(dims)
    if spec.form == "shared_basis":
        return (2 * spec.basis_groups * r * h if spec.bases else 0) + spec.num_banks * 3 * i * r
    if spec.form == "shared_core":  # three cores + per expert and projection 2 r (d_in + d_out)
        return 3 * i * h + spec.num_experts * 3 * 2 * r * (h + i)
    return spec.num_experts * r * 3 * (h + i)


def dense_layer_params(dims: MoEDims) -> int:
    """Routed-expert parameters of one dense MoE layer (gate, up, down of every expert)."""
    return dims.num_experts * 3 * dims.intermediate * dims.hidden


def read_moe_svd_config(model_dir: str | os.PathLike) -> MoESVDConfig | None:
    """The validated `moe_svd` block of `model_dir/config.json`, or None for a dense checkpoint."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    block = config.get(CONFIG_KEY)
    return None if block is None else MoESVDConfig.from_dict(block)
