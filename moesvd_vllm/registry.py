"""Registration of the plugin-only architectures with vLLM's ModelRegistry.

`register_models()` runs in every vLLM process (API server, engine core, workers, registry inspection):
it is idempotent and imports no model code. Every plugin architecture of the architecture table
(`moesvd_vllm.architectures.PLUGIN_ARCHITECTURES`) whose original architecture this vLLM supports is
registered lazily as `moesvd_vllm.models:<name>` (vLLM imports it only when it serves it).
"""

from __future__ import annotations

import logging

from moesvd_vllm.architectures import PLUGIN_ARCHITECTURES

logger = logging.getLogger("vllm.moesvd_vllm")

MODELS_MODULE = "moesvd_vllm.models"


def servable_architectures(supported: set[str]) -> dict[str, str]:
    """Plugin architecture -> its first original architecture in `supported` (vLLM's own names)."""
    servable: dict[str, str] = {}
    for original, plugin in PLUGIN_ARCHITECTURES.items():
        if original in supported and plugin not in servable:
            servable[plugin] = original
    return servable


def register_models() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    servable = servable_architectures(supported)
    for plugin in servable:
        if plugin not in supported:
            ModelRegistry.register_model(plugin, f"{MODELS_MODULE}:{plugin}")
    missing = sorted(set(PLUGIN_ARCHITECTURES.values()) - set(servable))
    if missing:
        logger.debug("moesvd: this vLLM has no model class for the originals of %s", missing)
    _register_preflight_checks(servable)


def _register_preflight_checks(servable: dict[str, str]) -> None:
    """Have vLLM check a compressed checkpoint while it builds its config, before the engine starts.

    vLLM runs the original architecture's own config hook (if it has one, e.g. DeepSeek's) from its
    `MODELS_CONFIG_MAP`; the plugin architecture gets the pre-flight check, which then runs that hook too.
    """
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # a vLLM without per-architecture config hooks: the load-time check remains
        logger.debug("moesvd: no MODELS_CONFIG_MAP in this vLLM; skipping the pre-flight check")
        return
    from moesvd_vllm.preflight import CompressedCheckpointPreflight

    for plugin, original in servable.items():
        if plugin in MODELS_CONFIG_MAP:
            continue
        stock_hook = MODELS_CONFIG_MAP.get(original)
        MODELS_CONFIG_MAP[plugin] = (CompressedCheckpointPreflight if stock_hook is None
                                     else _chained(stock_hook, plugin))


def _chained(stock_hook, plugin: str):
    """A config hook running the original architecture's hook, then the pre-flight check."""
    from moesvd_vllm.preflight import CompressedCheckpointPreflight

    class Hook(CompressedCheckpointPreflight):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            stock_hook.verify_and_update_config(vllm_config)
            CompressedCheckpointPreflight.verify_and_update_config(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            stock_hook.verify_and_update_model_config(model_config)

    Hook.__name__ = Hook.__qualname__ = f"{plugin}Config"
    return Hook
