"""Registration of the plugin-only architectures with vLLM's ModelRegistry."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.moesvd_vllm")

# Architecture name -> "module:Class", registered lazily so vLLM imports the model only when used.
PLUGIN_ARCHITECTURES: dict[str, str] = {
    "MoESVDQwen3MoeForCausalLM": "moesvd_vllm.models.qwen3_moe:MoESVDQwen3MoeForCausalLM",
    "MoESVDMixtralForCausalLM": "moesvd_vllm.models.mixtral:MoESVDMixtralForCausalLM",
}


def register_models() -> None:
    if not PLUGIN_ARCHITECTURES:
        return
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in PLUGIN_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
