"""moesvd-vllm: serve MoE-SVD compressed Mixture-of-Experts checkpoints with vLLM.

This module is imported in every vLLM process (API server, engine core, workers) through the
`vllm.general_plugins` entry point, so it must stay cheap: no torch or vLLM import at module level.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point: register the plugin-only model architectures (idempotent)."""
    from moesvd_vllm.registry import register_models

    register_models()
