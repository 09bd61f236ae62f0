"""What every MoE-SVD plugin architecture shares: the causal-LM shell and the checked weight loading.

An architecture file (qwen3_moe.py, mixtral.py) provides the decoder layer that puts a
`LowRankSharedBasisMoE` where the checkpoint has a decomposed layer and vLLM's stock MoE block elsewhere,
and the model class that stacks those layers. This module adds the LM head and the load step that checks the
checkpoint against its `moe_svd` block (moesvd_vllm/loading.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from moesvd_vllm.layers import CompressionConfigError, LowRankSharedBasisMoE, compression_config
from moesvd_vllm.loading import CompressedCheckpointValidator
from moesvd_vllm.architectures import moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.format.schema import MoESVDConfig

logger = logging.getLogger("vllm.moesvd_vllm.models")


def check_servable(hf_config, compression: MoESVDConfig, vllm_config: VllmConfig) -> None:
    """Refuse what the plugin cannot serve exactly, before anything is allocated."""
    config = hf_config.to_dict()
    not_moe = sorted(set(compression.decomposed_layers) - set(moe_layer_indices(config)))
    if not_moe:
        raise CompressionConfigError(
            f"moe_svd.layers names decoder layer(s) {not_moe}, which are not MoE layers of this "
            f"{config.get('model_type')} model; the checkpoint's config.json and moe_svd block disagree")
    if vllm_config.quant_config is not None:
        raise CompressionConfigError(
            "quantization is not supported together with MoE-SVD compressed layers; start the server "
            "without --quantization")


def decomposed_moe_block(vllm_config: VllmConfig, compression: MoESVDConfig, layer_index: int,
                         prefix: str, *, renormalize: bool,
                         shared_experts: nn.Module | None = None) -> LowRankSharedBasisMoE | None:
    """The low-rank block for `layer_index` when the checkpoint decomposed it, else None (stock block)."""
    spec = compression.layer(layer_index)
    if spec is None:
        return None
    hf_config = vllm_config.model_config.hf_text_config
    config = hf_config.to_dict()
    layout = moe_layout(config["model_type"])
    dims = moe_dims(config)
    return LowRankSharedBasisMoE(
        vllm_config=vllm_config, spec=spec, hidden_size=dims.hidden,
        intermediate_size=spec.kept_intermediate(dims),
        top_k=dims.top_k, renormalize=renormalize,
        expert_names=(layout.gate_proj, layout.up_proj, layout.down_proj), prefix=prefix,
        shared_experts=shared_experts, activation=getattr(hf_config, "hidden_act", "silu"))


class MoESVDForCausalLM(nn.Module, SupportsPP):
    """Causal LM over a `model` built by the subclass's `build_model`; loads with schema validation."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        self.config = config
        self.compression = compression_config(config)
        check_servable(config, self.compression, vllm_config)
        self.model = self.build_model(vllm_config, maybe_prefix(prefix, "model"), self.compression)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        logger.info("moesvd: %s with %d MoE-SVD layer(s) (method %s, format %d)", type(self).__name__,
                    len(self.compression.layers), self.compression.method,
                    self.compression.format_version)

    @classmethod
    def build_model(cls, vllm_config: VllmConfig, prefix: str, compression: MoESVDConfig) -> nn.Module:
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        config = self.config.to_dict()
        validator = CompressedCheckpointValidator(
            config["model_type"], self.compression, moe_dims(config),
            range(self.model.start_layer, self.model.end_layer))
        loaded = AutoWeightsLoader(self).load_weights(validator.inspect(weights))
        validator.finish()
        return loaded
