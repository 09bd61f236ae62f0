"""Session-wide tiny fixture checkpoints: each distinct build is written once and shared by every test file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from offline.fixtures.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory: `tiny_model_dir(arch, seed=0, init_std=..., dtype="float32", num_layers=4)` -> Path.

    Same arguments return the same directory (built once per session); treat it as read-only.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple, Path] = {}

    def get(arch: str, **kwargs) -> Path:
        key = (arch,) + tuple(sorted(kwargs.items()))
        if key not in built:
            name = "-".join([arch] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
            built[key] = build_tiny_checkpoint(arch, root / name, **kwargs)
        return built[key]

    return get


def tiny_qwen3_moe_block(hidden: int, intermediate: int, num_experts: int, std: float = 0.5):
    """A transformers Qwen3-MoE sparse block (top-2) with seeded N(0, std) weights, for statistics tests."""
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=intermediate,
                                  num_experts=num_experts, num_experts_per_tok=2, num_attention_heads=2,
                                  num_key_value_heads=1)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, std)
    return block
