"""The architecture table: every Mixture-of-Experts model type moesvd-vllm knows, in one place.

For each Hugging Face `model_type`: where its decoder layer keeps the routed experts and how they are
named on disk (Hub names), which config keys give the MoE dimensions, which decoder layers are MoE layers,
and the plugin-only architecture name a compressed checkpoint of it carries. The registry, the compressor's
architecture check, the fixtures and the docs read this table; adding an architecture is one entry here
(plus its tests). Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moesvd_vllm.errors import ArchitectureError


# Original architecture -> plugin-only architecture. Stock vLLM does not know the plugin names, so a
# compressed checkpoint served without the plugin fails loudly instead of producing NaN.
PLUGIN_ARCHITECTURES: dict[str, str] = {
    "Qwen3MoeForCausalLM": "MoESVDQwen3MoeForCausalLM",
    "MixtralForCausalLM": "MoESVDMixtralForCausalLM",
    "Qwen2MoeForCausalLM": "MoESVDQwen2MoeForCausalLM",
    "DeepseekV2ForCausalLM": "MoESVDDeepseekV2ForCausalLM",
    "PhiMoEForCausalLM": "MoESVDPhiMoEForCausalLM",
    "PhimoeForCausalLM": "MoESVDPhiMoEForCausalLM",  # transformers' own spelling of the same class
    "OlmoeForCausalLM": "MoESVDOlmoeForCausalLM",
}


@dataclass(frozen=True)
class MoELayout:
    """Where a model type keeps its routed experts, with the on-disk (Hugging Face Hub) tensor names."""

    moe_module: str  # decoder-layer attribute of the MoE block: "mlp" or "block_sparse_moe"
    gate_proj: str  # per-expert projection names under `<moe_module>.experts.<e>.`
    up_proj: str
    down_proj: str
    router: str = "gate"  # `<moe_module>.<router>.weight` [E, H]
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)


_QWEN_STYLE = MoELayout("mlp", "gate_proj", "up_proj", "down_proj")
_MIXTRAL_STYLE = MoELayout("block_sparse_moe", "w1", "w3", "w2",
                           num_experts_keys=("num_local_experts",),
                           intermediate_keys=("intermediate_size",))

MOE_LAYOUTS: dict[str, MoELayout] = {
    "qwen3_moe": _QWEN_STYLE,
    "qwen2_moe": _QWEN_STYLE,
    "olmoe": dataclasses.replace(_QWEN_STYLE, intermediate_keys=("intermediate_size",)),
    "deepseek_v2": dataclasses.replace(_QWEN_STYLE, num_experts_keys=("n_routed_experts",)),
    "mixtral": _MIXTRAL_STYLE,
    "phimoe": _MIXTRAL_STYLE,
}


def moe_layout(model_type: str) -> MoELayout:
    try:
        return MOE_LAYOUTS[model_type]
    except KeyError:
        raise ArchitectureError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture; "
            f"supported: {sorted(MOE_LAYOUTS)}") from None


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
    """Decoder layers whose MLP is a routed MoE block (others are dense MLPs)."""
    n = int(config["num_hidden_layers"])
    model_type = config.get("model_type", "")
    if model_type in ("qwen3_moe", "qwen2_moe"):
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers") or [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if model_type == "deepseek_v2":
        first_dense = int(config.get("first_k_dense_replace", 0) or 0)
        freq = int(config.get("moe_layer_freq", 1) or 1)
        return [i for i in range(n) if i >= first_dense and i % freq == 0]
    moe_layout(model_type)  # raises for unsupported types
    return list(range(n))


