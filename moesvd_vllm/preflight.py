"""Pre-flight check of a compressed checkpoint, run by vLLM while it builds its config (API server).

vLLM calls `verify_and_update_config(vllm_config)` of the class registered for the model's architecture in
`vllm.model_executor.models.config.MODELS_CONFIG_MAP` before it spawns the engine. For the plugin
architectures that is `CompressedCheckpointPreflight`: it validates the `moe_svd` block (format version,
servable forms, layer indices) and, for a local directory of safetensors files, reads only the file
headers to check every decomposed layer's tensors (names, shapes, dtypes) and that no shard is truncated.
A broken checkpoint so fails in seconds, before any weight is read; the load-time check inside the worker
(moesvd_vllm/loading.py) still guards every other way of loading weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moesvd_vllm.format.safetensors_io import weight_files
from moesvd_vllm.format.validator import validate_checkpoint_files

logger = logging.getLogger("vllm.moesvd_vllm.preflight")


def check_checkpoint_files(model_dir: Path, hf_config, compression) -> bool:
    """Validate the decomposed layers' tensors from the file headers; False when there is nothing to read."""
    if not weight_files(model_dir, required=False):
        return False
    validate_checkpoint_files(model_dir, hf_config.to_dict(), compression)
    return True


class CompressedCheckpointPreflight:
    """`MODELS_CONFIG_MAP` entry of the plugin architectures (vLLM calls the two static methods)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from moesvd_vllm.layers import compression_config, serving_betas

        model_config = vllm_config.model_config
        hf_config = model_config.hf_text_config
        compression = compression_config(hf_config)
        betas = serving_betas(hf_config, compression)  # a bad beta or override fails here, in the API server
        if betas:
            logger.info("moesvd: expert skipping, beta per MoE layer %s", betas)
        model_dir = Path(model_config.model)
        if model_dir.is_dir() and check_checkpoint_files(model_dir, hf_config, compression):
            logger.info("moesvd: %s: %d MoE-SVD layer(s) (method %s), checkpoint files match the schema",
                        model_dir.name, len(compression.layers), compression.method)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
