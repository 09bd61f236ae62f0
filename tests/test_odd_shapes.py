"""Every compression method on awkward shapes (issue 11 item 3), evaluated by the PyTorch reference.

Two tiny Qwen3-MoE fixtures whose shapes are nothing like the usual powers of two:
* "fine": bfloat16, 6 experts (fewer than a U-trimming group of 8, not a power of two), hidden 160 and
  expert intermediate 96 (I < H, as in Qwen3-30B-A3B), per-expert Hub tensor names;
* "wide": float32, 6 experts, hidden 96 and intermediate 160 (I > H), transformers 5's fused expert tensors
  (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) on disk.
Each registered method compresses each of them; the output must validate as a compressed checkpoint (the
reference loads it through the format's validator) and give finite logits. The paper's method used to
stop here with an internal AssertionError (its rank exceeded what one expert's `down` can give).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moesvd_vllm.architectures import moe_dims, moe_layer_indices, moe_layout
from moesvd_vllm.format.directories import read_config
from moesvd_vllm.format.schema import read_moe_svd_config
from offline.compress import CompressionOptions, compress
from offline.fixtures.tiny import build_tiny_checkpoint
from offline.methods import registered_methods

CALIB = Path(__file__).resolve().parent.parent / "offline" / "bundled" / "kjv_text" / "validation.txt"
SHAPES = {
    "fine": dict(dtype="bfloat16", fused=False,
                 dims={"num_experts": 6, "hidden_size": 160, "moe_intermediate_size": 96}),
    "wide": dict(dtype="float32", fused=True,
                 dims={"num_experts": 6, "hidden_size": 96, "moe_intermediate_size": 160}),
}


def _fuse_experts(model_dir: Path) -> None:
    """Rewrite the per-expert Hub tensors of `model_dir` as transformers 5's fused expert tensors."""
    config = read_config(model_dir)
    dims, layout = moe_dims(config), moe_layout(config["model_type"])
    path = model_dir / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for index in moe_layer_indices(config):
        prefix = f"model.layers.{index}.{layout.moe_module}.experts"
        stacked = {proj: torch.stack([tensors.pop(f"{prefix}.{e}.{proj}.weight") for e in range(dims.num_experts)])
                   for proj in (layout.gate_proj, layout.up_proj, layout.down_proj)}
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([stacked[layout.gate_proj], stacked[layout.up_proj]], 1)
        tensors[f"{prefix}.down_proj"] = stacked[layout.down_proj]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    built = {}

    def get(shape: str) -> Path:
        if shape not in built:
            spec = SHAPES[shape]
            model = build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("odd") / shape, num_layers=2,
                                          dtype=spec["dtype"], dims=spec["dims"])
            if spec["fused"]:
                _fuse_experts(model)
            built[shape] = model
        return built[shape]

    return get


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_every_method_compresses_awkward_shapes(odd_model, tmp_path, shape, method):
    from offline.reference import load_reference_model

    options = CompressionOptions(ratio=0.3, ratio_tolerance=0.15, method=method, calib=str(CALIB),
                                 num_samples=8, seq_len=32, batch_size=4)
    out = compress(odd_model(shape), tmp_path / "out", options)
    block = read_moe_svd_config(out)
    assert block.layers, f"{method} on {shape}: nothing was decomposed"
    assert abs(block.params.ratio - 0.3) <= 0.15
    model = load_reference_model(out, dtype="float32").eval()  # validates every tensor against the block
    with torch.no_grad():
        logits = model(torch.arange(1, 33).unsqueeze(0)).logits
    assert torch.isfinite(logits).all(), f"{method} on {shape}: non-finite logits"
