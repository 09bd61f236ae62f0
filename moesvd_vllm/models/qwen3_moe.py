"""MoESVDQwen3MoeForCausalLM: Qwen3-MoE with MoE-SVD low-rank shared-basis layers (vLLM 0.32).

Built on vLLM's own Qwen3-MoE classes (model_executor/models/qwen3_moe.py): the model is vLLM's
`Qwen3MoeModel` with our decoder layer through its `decoder_layer_type` hook. The decoder layer repeats
the stock constructor (attention, norms) and puts a `LowRankSharedBasisMoE` at `mlp` where the checkpoint
decomposed the layer; the stock `Qwen3MoeSparseMoeBlock` / `Qwen3MoeMLP` elsewhere. Its forward is the stock
one. Routing is Qwen3's: softmax over the experts, top-k, renormalised when `norm_topk_prob`.

Checkpoint names (on disk -> module), decomposed layer L:
    model.layers.L.mlp.gate.weight                 -> mlp.gate (router, replicated)
    model.layers.L.mlp.moe_svd_in.weight  [r, H]   -> mlp.moe_svd_in (replicated)
    model.layers.L.mlp.moe_svd_out.weight [H, r]   -> mlp.moe_svd_out (replicated)
    model.layers.L.mlp.experts.k.{gate,up}_proj.weight [I, r] -> mlp.experts w13_weight[k] (sharded on I)
    model.layers.L.mlp.experts.k.down_proj.weight      [r, I] -> mlp.experts w2_weight[k]  (sharded on I)
Everything else keeps vLLM's stock Qwen3-MoE mapping (q/k/v -> qkv_proj, ...).
"""

from __future__ import annotations

import functools

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeDecoderLayer,
    Qwen3MoeMLP,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)
from vllm.model_executor.models.utils import extract_layer_index

from moesvd_vllm.layers import CompressionConfigError
from moesvd_vllm.models.common import MoESVDForCausalLM, decomposed_moe_block
from moesvd_vllm.format.schema import MoESVDConfig


def _is_moe_layer(config, layer_index: int) -> bool:
    """Same rule as vLLM's Qwen3MoeDecoderLayer."""
    mlp_only_layers = getattr(config, "mlp_only_layers", None) or []
    return (layer_index not in mlp_only_layers and config.num_experts > 0
            and (layer_index + 1) % config.decoder_sparse_step == 0)


def _refuse_shared_expert(config, prefix: str) -> None:
    if getattr(config, "shared_expert_intermediate_size", 0) > 0:
        raise CompressionConfigError(
            f"{prefix}: Qwen3-MoE variants with a shared expert are not supported by the moesvd plugin")


class MoESVDQwen3MoeDecoderLayer(Qwen3MoeDecoderLayer):
    """Qwen3-MoE decoder layer whose MoE block is low-rank where the checkpoint decomposed it."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", *, compression: MoESVDConfig) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen3MoeAttention(
            hidden_size=self.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=getattr(config, "attention_bias", False),
            head_dim=getattr(config, "head_dim", None),
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None),
        )
        layer_index = extract_layer_index(prefix)
        self.mlp = self._build_mlp(vllm_config, config, compression, layer_index, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @staticmethod
    def _build_mlp(vllm_config: VllmConfig, config, compression: MoESVDConfig, layer_index: int,
                   prefix: str) -> nn.Module:
        if not _is_moe_layer(config, layer_index):
            return Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                               hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                               prefix=prefix)
        _refuse_shared_expert(config, prefix)
        block = decomposed_moe_block(vllm_config, compression, layer_index, prefix,
                                     renormalize=config.norm_topk_prob)
        return block if block is not None else Qwen3MoeSparseMoeBlock(vllm_config=vllm_config, prefix=prefix)


class MoESVDQwen3MoeForCausalLM(MoESVDForCausalLM):
    """vLLM architecture `MoESVDQwen3MoeForCausalLM` (config.json `architectures`, model_type qwen3_moe)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    fall_back_to_pt_during_load = False

    @classmethod
    def build_model(cls, vllm_config: VllmConfig, prefix: str, compression: MoESVDConfig) -> nn.Module:
        layer_type = functools.partial(MoESVDQwen3MoeDecoderLayer, compression=compression)
        return Qwen3MoeModel(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=layer_type)
