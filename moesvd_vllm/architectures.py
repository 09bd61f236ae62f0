"""The architecture table: every Mixture-of-Experts model type moesvd-vllm knows, in one place.

One `Architecture` entry per Hugging Face `model_type` (`ARCHITECTURES`) holds:

* `hub_architectures`: the `architectures` names its Hub config.json carries (and aliases);
* `plugin_architecture`: the plugin-only name a compressed checkpoint carries, or None when the plugin
  cannot serve the type (then only the offline per-expert baselines accept it, see `require_servable`);
* `layout`: the on-disk (Hub) names of the MoE block, its router, its per-expert projections and its
  shared experts, and the config keys of the MoE dimensions;
* `moe_layers`: the rule that says which decoder layers are MoE layers (the rest are dense MLPs);
* `routing`: how the router picks and weights experts (softmax / sigmoid / sparsemixer, grouped top-k,
  score-correction bias, renormalisation, routed scaling).

Hub names are part of the checkpoint format and stay written here; the module names transformers 5 uses
in memory (`mlp.` for Mixtral's `block_sparse_moe.`, `mlp.router.` for PhiMoE's gate, fused
`experts.gate_up_proj` / `experts.down_proj`) are transformers' own `conversion_mapping`, read through
`module_name` / `hub_name` (tests check that the Hub names here are the ones transformers' converters
consume). The compressor's checks, the fixtures, the PyTorch reference, the plugin and the docs
(docs/architectures.md, rendered by `markdown_table`) read this table; adding an architecture is one entry
here plus its fixture and tests. Importing it is cheap (no torch, no vLLM, no transformers); only
`module_name` / `hub_name` import transformers, on first use.
"""

from __future__ import annotations

import functools
import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from moesvd_vllm.errors import ArchitectureError


# ------------------------------------------------------------------------------------------ names
@dataclass(frozen=True)
class MoELayout:
    """Where a model type keeps its routed experts, with the on-disk (Hugging Face Hub) tensor names."""

    moe_module: str  # decoder-layer attribute of the MoE block on disk: "mlp" or "block_sparse_moe"
    gate_proj: str  # per-expert projection names under `<moe_module>.experts.<e>.`
    up_proj: str
    down_proj: str
    router: str = "gate"  # `<moe_module>.<router>.weight` [E, H]
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)
    # `<moe_module>.<router>.<router_bias>` [E]: DeepSeek-V3's score-correction bias (selection only)
    router_bias: str | None = None
    # `<moe_module>.<shared_experts>.{gate,up,down}_proj.weight`: always-on experts next to the routed ones
    shared_experts: str | None = None
    shared_expert_gate: str | None = None  # `<moe_module>.<gate>.weight` [1, H]: sigmoid gate (qwen2_moe)

    def router_weight(self, layer_index: int) -> str:
        return f"model.layers.{layer_index}.{self.moe_module}.{self.router}.weight"


_QWEN_NAMES = dict(moe_module="mlp", gate_proj="gate_proj", up_proj="up_proj", down_proj="down_proj")
_MIXTRAL_NAMES = dict(moe_module="block_sparse_moe", gate_proj="w1", up_proj="w3", down_proj="w2",
                      num_experts_keys=("num_local_experts",), intermediate_keys=("intermediate_size",))


# ------------------------------------------------------------------------------------------ MoE layers
class MoELayerRule(Protocol):
    def indices(self, config: dict[str, Any]) -> list[int]:
        """Decoder layers whose MLP is a routed MoE block."""

    def describe(self) -> str: ...


def _int_key(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    return default if value is None else int(value)


@dataclass(frozen=True)
class EveryLayer:
    """Every decoder layer is a MoE layer (Mixtral, PhiMoE, OLMoE)."""

    def indices(self, config: dict[str, Any]) -> list[int]:
        return list(range(int(config["num_hidden_layers"])))

    def describe(self) -> str:
        return "every layer"


@dataclass(frozen=True)
class SparseStep:
    """Qwen: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers."""

    step_key: str = "decoder_sparse_step"
    dense_key: str = "mlp_only_layers"

    def indices(self, config: dict[str, Any]) -> list[int]:
        step = _int_key(config, self.step_key, 1) or 1
        dense = set(config.get(self.dense_key) or [])
        return [i for i in range(int(config["num_hidden_layers"])) if i not in dense and (i + 1) % step == 0]

    def describe(self) -> str:
        return f"(i + 1) % {self.step_key} == 0, not in {self.dense_key}"


@dataclass(frozen=True)
class FirstKDense:
    """DeepSeek / GLM: the first `first_k_dense_replace` layers are dense; after them every
    `moe_layer_freq`-th layer is MoE (vLLM's rule; transformers 5.19 reads first_k_dense_replace only,
    and every published checkpoint has moe_layer_freq 1, where the two agree)."""

    first_key: str = "first_k_dense_replace"
    freq_key: str | None = "moe_layer_freq"

    def indices(self, config: dict[str, Any]) -> list[int]:
        first = _int_key(config, self.first_key, 0)
        freq = (_int_key(config, self.freq_key, 1) or 1) if self.freq_key else 1
        return [i for i in range(int(config["num_hidden_layers"])) if i >= first and i % freq == 0]

    def describe(self) -> str:
        return f"i >= {self.first_key}" + (f", i % {self.freq_key} == 0" if self.freq_key else "")


# ------------------------------------------------------------------------------------------ routing
@dataclass(frozen=True)
class Routing:
    """How the router turns its logits into (top-k experts, weights).

    `renormalize`: True / False, or the config key that decides (e.g. "norm_topk_prob").
    `grouped`: experts in `n_group` groups, tokens restricted to the best `topk_group` groups.
    `correction_bias`: a per-expert bias added to the scores for the choice only, not the weights.
    `scaling_key`: config key of a factor multiplying the routing weights (routed_scaling_factor)."""

    scoring: str  # "softmax", "sigmoid" or "sparsemixer"
    renormalize: bool | str = False
    grouped: bool = False
    correction_bias: bool = False
    scaling_key: str | None = None
    note: str = ""

    def renormalizes(self, config: dict[str, Any]) -> bool:
        if isinstance(self.renormalize, bool):
            return self.renormalize
        return bool(config.get(self.renormalize))

    def describe(self) -> str:
        parts = [f"{self.scoring} top-k"]
        if self.grouped:
            parts.append("grouped (n_group / topk_group)")
        if self.correction_bias:
            parts.append("score-correction bias (choice only)")
        if isinstance(self.renormalize, str):
            parts.append(f"renormalised if {self.renormalize}")
        elif self.renormalize:
            parts.append("renormalised")
        if self.scaling_key:
            parts.append(f"x {self.scaling_key}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Architecture:
    """One Mixture-of-Experts model type (see the module docstring)."""

    model_type: str
    hub_architectures: tuple[str, ...]  # first = the Hub spelling written by the fixtures
    plugin_architecture: str | None  # None: the plugin cannot serve it (offline baselines only)
    layout: MoELayout
    moe_layers: MoELayerRule
    routing: Routing
    reference_checkpoint: str = ""  # the Hub model whose config layout the fixture follows
    notes: str = ""
    # vLLM 0.32 on CPU hosts: extra server flags this type needs to compute correctly, and the only dtypes
    # it runs in (empty: any); docs/architectures.md says why for each
    cpu_vllm_args: tuple[str, ...] = ()
    cpu_dtypes: tuple[str, ...] = ()

    @property
    def servable(self) -> bool:
        return self.plugin_architecture is not None


_DEEPSEEK_STYLE_LAYOUT = MoELayout(**_QWEN_NAMES, num_experts_keys=("n_routed_experts",),
                                   shared_experts="shared_experts")
_DEEPSEEK_V3_STYLE_LAYOUT = dataclasses.replace(_DEEPSEEK_STYLE_LAYOUT, router_bias="e_score_correction_bias")
# MLA on CPU: the CPU_MLA backend (AMX_MLA, picked on AMX CPUs, refuses float32 weights) and vLLM's
# native rotary embedding instead of its CPU kernel, which mis-rotates MLA's strided 3-D q_pe / k_pe views.
_CPU_MLA_ARGS = ("--attention-backend", "CPU_MLA", "--compilation-config", '{"custom_ops": ["-rotary_embedding"]}')
_SIGMOID_GROUPED = Routing("sigmoid", renormalize="norm_topk_prob", grouped=True, correction_bias=True,
                           scaling_key="routed_scaling_factor")

_ENTRIES = (
    Architecture(
        "qwen3_moe", ("Qwen3MoeForCausalLM",), "MoESVDQwen3MoeForCausalLM",
        MoELayout(**_QWEN_NAMES), SparseStep(), Routing("softmax", renormalize="norm_topk_prob"),
        reference_checkpoint="Qwen/Qwen3-30B-A3B"),
    Architecture(
        "mixtral", ("MixtralForCausalLM",), "MoESVDMixtralForCausalLM",
        MoELayout(**_MIXTRAL_NAMES), EveryLayer(), Routing("softmax", renormalize=True),
        reference_checkpoint="mistralai/Mixtral-8x7B-v0.1"),
    Architecture(
        "qwen2_moe", ("Qwen2MoeForCausalLM",), "MoESVDQwen2MoeForCausalLM",
        MoELayout(**_QWEN_NAMES, shared_experts="shared_expert", shared_expert_gate="shared_expert_gate"),
        SparseStep(), Routing("softmax", renormalize="norm_topk_prob"),
        reference_checkpoint="Qwen/Qwen1.5-MoE-A2.7B", notes="one shared expert behind a sigmoid gate"),
    Architecture(
        "olmoe", ("OlmoeForCausalLM",), "MoESVDOlmoeForCausalLM",
        MoELayout(**_QWEN_NAMES, intermediate_keys=("intermediate_size",)), EveryLayer(),
        Routing("softmax", renormalize="norm_topk_prob"), reference_checkpoint="allenai/OLMoE-1B-7B-0924"),
    Architecture(
        "phimoe", ("PhiMoEForCausalLM", "PhimoeForCausalLM"), "MoESVDPhiMoEForCausalLM",
        MoELayout(**_MIXTRAL_NAMES), EveryLayer(),
        Routing("sparsemixer", note="top-2, each pick a softmax masked by router_jitter_noise (inference form)"),
        reference_checkpoint="microsoft/Phi-3.5-MoE-instruct",
        notes="transformers' class is spelled PhimoeForCausalLM; the Hub and vLLM spell PhiMoEForCausalLM"),
    Architecture(
        "deepseek_v2", ("DeepseekV2ForCausalLM",), "MoESVDDeepseekV2ForCausalLM",
        _DEEPSEEK_STYLE_LAYOUT, FirstKDense(),
        Routing("softmax", grouped=True, scaling_key="routed_scaling_factor",
                note="topk_method greedy or group_limited_greedy; transformers 5.19 ignores norm_topk_prob "
                     "(vLLM honours it; published checkpoints set it false)"),
        reference_checkpoint="deepseek-ai/DeepSeek-V2-Lite", notes="MLA attention, dense first layers",
        cpu_vllm_args=_CPU_MLA_ARGS),
    Architecture(
        "deepseek_v3", ("DeepseekV3ForCausalLM",), "MoESVDDeepseekV3ForCausalLM",
        _DEEPSEEK_V3_STYLE_LAYOUT,
        FirstKDense(), _SIGMOID_GROUPED, reference_checkpoint="deepseek-ai/DeepSeek-V3",
        notes="MLA attention with q compression, dense first layers; also Kimi-K2 (same model type)",
        cpu_vllm_args=_CPU_MLA_ARGS),
    Architecture(
        "glm4_moe", ("Glm4MoeForCausalLM",), "MoESVDGlm4MoeForCausalLM",
        _DEEPSEEK_V3_STYLE_LAYOUT,
        FirstKDense(freq_key=None), _SIGMOID_GROUPED, reference_checkpoint="zai-org/GLM-4.5-Air",
        notes="grouped-query attention with partial RoPE and q/k norms; dense first layers"),
    Architecture(
        "qwen3_next", ("Qwen3NextForCausalLM",), "MoESVDQwen3NextForCausalLM",
        MoELayout(**_QWEN_NAMES, shared_experts="shared_expert", shared_expert_gate="shared_expert_gate"),
        SparseStep(), Routing("softmax", renormalize="norm_topk_prob"),
        reference_checkpoint="Qwen/Qwen3-Next-80B-A3B-Instruct",
        notes="hybrid Gated DeltaNet / gated attention; vLLM 0.32 on CPU runs its linear attention in "
              "bfloat16 only, with linear head dims its CPU kernel supports (128)",
        cpu_dtypes=("bfloat16",)),
)

ARCHITECTURES: dict[str, Architecture] = {entry.model_type: entry for entry in _ENTRIES}

# model_type -> layout (older name of the table's layout column, kept for its readers)
MOE_LAYOUTS: dict[str, MoELayout] = {t: a.layout for t, a in ARCHITECTURES.items()}

# Original architecture -> plugin-only architecture, for every servable type. Stock vLLM does not know the
# plugin names, so a compressed checkpoint served without the plugin fails loudly instead of producing NaN.
PLUGIN_ARCHITECTURES: dict[str, str] = {
    hub: a.plugin_architecture for a in ARCHITECTURES.values() if a.plugin_architecture
    for hub in a.hub_architectures}


def architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ArchitectureError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture; "
            f"supported: {sorted(ARCHITECTURES)}") from None


def moe_layout(model_type: str) -> MoELayout:
    return architecture(model_type).layout


def servable_model_types() -> list[str]:
    return sorted(t for t, a in ARCHITECTURES.items() if a.servable)


def require_servable(model_type: str, *, offline_only: bool = False) -> Architecture:
    """The entry of `model_type`, refusing a type the plugin cannot serve unless the output is an
    offline-only baseline (`offline_only`: the per-expert methods, evaluated by the PyTorch reference)."""
    entry = architecture(model_type)
    if not entry.servable and not offline_only:
        raise ArchitectureError(
            f"model_type {model_type!r} can be compressed only for offline evaluation: the moesvd plugin "
            f"cannot serve it. Architectures it serves: {servable_model_types()}. Use a per-expert baseline "
            f"method (svd, whitened-svd) for an offline-only checkpoint.")
    return entry


OFFLINE_ONLY_PREFIX = "MoESVDOfflineOnly"


def compressed_architectures(model_type: str, original: list[str]) -> list[str]:
    """The `architectures` a compressed checkpoint of `model_type` carries: the plugin-only name when the
    plugin serves the type, else an offline-only name that no vLLM registers (so serving it fails loudly;
    the PyTorch reference reads `moe_svd.original_architectures`)."""
    entry = architecture(model_type)
    unknown = [a for a in original if a not in entry.hub_architectures]
    if not original or unknown:
        raise ArchitectureError(f"architectures {original} of config.json are not {model_type}'s "
                                f"{list(entry.hub_architectures)}")
    return [entry.plugin_architecture or f"{OFFLINE_ONLY_PREFIX}{a}" for a in original]


# ------------------------------------------------------------------------------------------ dimensions
def _first_key(config: dict[str, Any], keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise ArchitectureError(f"config.json has none of {list(keys)} ({what})")


@dataclass(frozen=True)
class MoEDims:
    num_experts: int  # E, routed
    top_k: int
    hidden: int  # H
    intermediate: int  # I, per routed expert


def moe_dims(config: dict[str, Any]) -> MoEDims:
    """Routed-expert dimensions read from a config.json dict."""
    layout = moe_layout(config.get("model_type", ""))
    return MoEDims(
        num_experts=_first_key(config, layout.num_experts_keys, "number of routed experts"),
        top_k=_first_key(config, layout.top_k_keys, "experts per token"),
        hidden=_first_key(config, ("hidden_size",), "hidden size"),
        intermediate=_first_key(config, layout.intermediate_keys, "expert intermediate size"),
    )


def moe_layer_indices(config: dict[str, Any]) -> list[int]:
    """Decoder layers whose MLP is a routed MoE block (others are dense MLPs), by the entry's rule."""
    return architecture(config.get("model_type", "")).moe_layers.indices(config)


# ------------------------------------------------------------------------------------------ module names
@functools.cache
def _renamings(model_type: str) -> tuple[list, list]:
    """transformers' WeightRenaming transforms of `model_type` (Hub -> module) and their reverses."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    forward = [t for t in get_checkpoint_conversion_mapping(model_type) or []
               if isinstance(t, WeightRenaming)]
    return forward, [t.reverse_transform() for t in reversed(forward)]


def _apply(transforms: list, name: str) -> str:
    for transform in transforms:
        name, _ = transform.rename_source_key(name)
    return name


def module_name(model_type: str, hub_name: str) -> str:
    """transformers 5's in-memory name of a (non-expert) Hub tensor name, e.g. phimoe
    `model.layers.0.block_sparse_moe.gate.weight` -> `model.layers.0.mlp.router.weight`."""
    return _apply(_renamings(model_type)[0], hub_name)


def module_moe_block(model_type: str, layer_index: int) -> str:
    """transformers 5's module path of a layer's MoE block, e.g. `model.layers.3.mlp` (Mixtral too)."""
    hub_experts = f"model.layers.{layer_index}.{moe_layout(model_type).moe_module}.experts"
    return module_name(model_type, hub_experts).removesuffix(".experts")


def hub_name(model_type: str, module_name_: str) -> str:
    """The inverse of `module_name`: the on-disk name of an in-memory parameter name."""
    return _apply(_renamings(model_type)[1], module_name_)


# ------------------------------------------------------------------------------------------ docs
def markdown_table() -> str:
    """The table as Markdown (docs/architectures.md embeds it; a test keeps the two equal)."""
    rows = ["| model_type | Hub architecture | plugin architecture | MoE block / experts (Hub names) | "
            "MoE layers | routing | shared experts | reference checkpoint | vLLM 0.32 on CPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in ARCHITECTURES.values():
        lay = a.layout
        names = f"`{lay.moe_module}.experts.<e>.{{{lay.gate_proj},{lay.up_proj},{lay.down_proj}}}`"
        shared = f"`{lay.shared_experts}`" if lay.shared_experts else "none"
        if lay.shared_expert_gate:
            shared += f" + `{lay.shared_expert_gate}`"
        cpu = [f"{'/'.join(a.cpu_dtypes)} only"] if a.cpu_dtypes else []
        cpu += [f"`{' '.join(a.cpu_vllm_args)}`"] if a.cpu_vllm_args else []
        rows.append(f"| {a.model_type} | {', '.join(a.hub_architectures)} | {a.plugin_architecture or 'none'} | "
                    f"{names} | {a.moe_layers.describe()} | {a.routing.describe()} | {shared} | "
                    f"{a.reference_checkpoint} | {'; '.join(cpu) or 'as is'} |")
    return "\n".join(rows) + "\n"
