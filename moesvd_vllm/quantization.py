"""The vLLM quantization config that hands each decomposed MoE layer its `SharedBasisExperts` method.

vLLM asks a model's `QuantizationConfig` for the method of every layer it builds (`get_quant_method(layer,
prefix)`), and every stock MoE model passes its config to its fused-MoE layers: this is the seam
compressed-tensors uses, and the one through which the plugin changes only the routed experts of the
decomposed layers while each architecture builds everything else (attention, router, shared experts,
dense layers, routed scaling) with its own, unchanged vLLM code. Linear layers get vLLM's unquantized
method, routed experts of layers the checkpoint left dense get vLLM's default (None), other layers
nothing. The plugin model classes (moesvd_vllm/models.py) install this config; it is not a
checkpoint quantization format (no `quantization_config` in config.json).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import extract_layer_index

from moesvd_vllm.architectures import moe_dims
from moesvd_vllm.format.schema import MoESVDConfig
from moesvd_vllm.layers import CompressionConfigError, SharedBasisExperts
from moesvd_vllm.skip_kernel import SkippingUnquantizedMethod

NAME = "moe_svd"


class MoESVDQuantizationConfig(QuantizationConfig):
    """Routed experts of the layers in `compression.layers` run through `SharedBasisExperts`."""

    def __init__(self, compression: MoESVDConfig, hf_config: dict[str, Any]):
        super().__init__()
        self.compression = compression
        self.model_type = hf_config["model_type"]
        self.dims = moe_dims(hf_config)
        self.skip_betas: dict[int, float] = {}  # set by install_compression (moesvd_vllm.layers.serving_betas)

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MoESVDQuantizationConfig":
        raise CompressionConfigError(
            f"`{NAME}` is not a checkpoint quantization method: a compressed checkpoint names a moesvd "
            "plugin architecture in config.json (`moesvd compress` writes it), with no quantization_config")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if not isinstance(layer, RoutedExperts):
            return None
        index = extract_layer_index(prefix)
        spec = self.compression.layer(index)
        beta = self.skip_betas.get(index, 0.0)
        if spec is None:  # a MoE layer the checkpoint left dense: vLLM's own method (with skipping if asked)
            return None if beta == 0.0 else SkippingUnquantizedMethod(layer.moe_config, beta, index)
        return SharedBasisExperts(layer.moe_config, spec, self.dims, self.model_type, index, skip_beta=beta)
