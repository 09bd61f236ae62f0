"""The bundled models' shapes and training recipes, and the per-layer load-balancing loss.

Two models ship (docs/bundled-model.md):
  moe_mini  4 layers, H 128, 8 experts top-2, I 256 = 2H, trained on the KJV (the first demo model)
  moe_fine  the production regime: 6 layers, H 256, 32 fine-grained experts top-4, I 128 < H (as in
            Qwen3-30B-A3B, DeepSeek-V3, OLMoE), a per-layer balancing loss, trained on the KJV, the
            Python documentation and the Debian Reference; weights committed in bfloat16
`--hidden-size / --layers / --experts` scale a preset up (on a GPU: `--device cuda`), same script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class Preset:
    shape: ModelShape
    sources: tuple[str, ...]  # offline.bundled.sources names the model trains on
    steps: int
    batch_size: int
    seed: int
    balance: str  # "pooled" (transformers' loss over all layers' logits) or "per-layer"
    router_aux_loss_coef: float
    save_dtype: str  # "float32" | "bfloat16"
    experts_implementation: str  # transformers' expert kernels: "eager" | "grouped_mm"


PRESETS = {
    "moe_mini": Preset(ModelShape(), ("kjv",), steps=2000, batch_size=12, seed=20251123, balance="pooled",
                       router_aux_loss_coef=0.005, save_dtype="float32", experts_implementation="eager"),
    "moe_fine": Preset(
        ModelShape(vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
                   moe_intermediate_size=128),
        ("kjv", "python-docs", "debian-reference"), steps=3000, batch_size=8, seed=20261202,
        balance="per-layer", router_aux_loss_coef=0.01, save_dtype="bfloat16", experts_implementation="grouped_mm"),
}


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss computed within each layer, averaged over layers.

    For one layer with E experts: E * sum_e f_e * P_e, where f_e is the share of the layer's top-k
    assignments that go to expert e and P_e its mean router probability (Fedus et al. 2021, Eq. 4).
    It is 1 when routing is uniform. transformers' `load_balancing_loss_func` pools all layers' logits
    first, which balances an expert index across layers and leaves dead experts inside a layer.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        share = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / chosen.numel()
        losses.append(num_experts * torch.sum(share * probs.mean(dim=0)))
    return torch.stack(losses).mean()
