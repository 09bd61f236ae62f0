"""Registration of the plugin-only architectures with vLLM's ModelRegistry.

`register_models()` runs in every vLLM process (API server, engine core, workers, registry inspection):
it is idempotent and imports no model code (vLLM imports a model module only when it serves it).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.moesvd_vllm")

# Architecture name -> "module:Class", registered lazily so vLLM imports the model only when used.
PLUGIN_ARCHITECTURES: dict[str, str] = {
    "MoESVDQwen3MoeForCausalLM": "moesvd_vllm.models.qwen3_moe:MoESVDQwen3MoeForCausalLM",
    "MoESVDMixtralForCausalLM": "moesvd_vllm.models.mixtral:MoESVDMixtralForCausalLM",
}


def register_models() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in PLUGIN_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    _register_preflight_checks()


def _register_preflight_checks() -> None:
    """Have vLLM check a compressed checkpoint while it builds its config, before the engine starts."""
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # a vLLM without per-architecture config hooks: the load-time check remains
        logger.debug("moesvd: no MODELS_CONFIG_MAP in this vLLM; skipping the pre-flight check")
        return
    from moesvd_vllm.preflight import CompressedCheckpointPreflight

    for arch in PLUGIN_ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(arch, CompressedCheckpointPreflight)
