"""MoESVDMixtralForCausalLM: Mixtral with MoE-SVD low-rank shared-basis layers (vLLM 0.32).

vLLM's Mixtral classes (model_executor/models/mixtral.py) have no hook for a custom MoE block, so this file
has its own decoder layer (the stock constructor with `block_sparse_moe` swapped where the checkpoint
decomposed the layer; the stock forward) and its own model class (the stock forward and weight mapping on
our layers, compiled with vLLM's `support_torch_compile`). Routing is Mixtral's: softmax over the experts,
top-k, always renormalised.

Checkpoint names (on disk -> module), decomposed layer L:
    model.layers.L.block_sparse_moe.gate.weight                 -> router (replicated)
    model.layers.L.block_sparse_moe.moe_svd_in.weight  [r, H]   -> input basis A (replicated)
    model.layers.L.block_sparse_moe.moe_svd_out.weight [H, r]   -> output basis B (replicated)
    model.layers.L.block_sparse_moe.experts.k.{w1,w3}.weight [I, r] -> experts w13_weight[k] (sharded on I)
    model.layers.L.block_sparse_moe.experts.k.w2.weight      [r, I] -> experts w2_weight[k]  (sharded on I)
Everything else keeps vLLM's stock Mixtral mapping.
"""

from __future__ import annotations

from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralModel,
    MixtralMoE,
)
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
)

from moesvd_vllm.models.common import MoESVDForCausalLM, decomposed_moe_block
from moesvd_vllm.format.schema import MoESVDConfig


class MoESVDMixtralDecoderLayer(MixtralDecoderLayer):
    """Mixtral decoder layer whose `block_sparse_moe` is low-rank where the checkpoint decomposed it."""

    def __init__(self, vllm_config: VllmConfig, prefix: str, compression: MoESVDConfig) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(
            config=config,
            hidden_size=self.hidden_size,
            num_heads=config.num_attention_heads,
            max_position=config.max_position_embeddings,
            num_kv_heads=config.num_key_value_heads,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        moe_prefix = f"{prefix}.block_sparse_moe"
        block = decomposed_moe_block(vllm_config, compression, extract_layer_index(prefix), moe_prefix,
                                     renormalize=True)
        self.block_sparse_moe = block if block is not None else MixtralMoE(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            quant_config=quant_config,
            prefix=moe_prefix,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile
class MoESVDMixtralModel(nn.Module):
    """vLLM's MixtralModel on MoESVDMixtralDecoderLayer (same forward, same checkpoint name mapping)."""

    hf_to_vllm_mapper = MixtralModel.hf_to_vllm_mapper
    embed_input_ids = MixtralModel.embed_input_ids
    forward = MixtralModel.forward
    load_weights = MixtralModel.load_weights

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", compression: MoESVDConfig):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.vocab_size = config.vocab_size
        self.org_vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(self.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: MoESVDMixtralDecoderLayer(vllm_config, prefix, compression),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)


class MoESVDMixtralForCausalLM(MoESVDForCausalLM):
    """vLLM architecture `MoESVDMixtralForCausalLM` (config.json `architectures`, model_type mixtral)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    fall_back_to_pt_during_load = False

    @classmethod
    def build_model(cls, vllm_config: VllmConfig, prefix: str, compression: MoESVDConfig) -> nn.Module:
        return MoESVDMixtralModel(vllm_config=vllm_config, prefix=prefix, compression=compression)
