"""Calibration statistics follow each architecture's own routing and count real tokens only.

`ExpertStatisticsHook` sits on the transformers block's `experts(hidden, top_k_index, top_k_weights)`
call, so whatever the router does (softmax top-k, DeepSeek-V3 / GLM-4.5 sigmoid scores with a grouped
choice, a score-correction bias and a routed scaling factor) reaches the statistics unchanged. Checked
here against the block's own router on the same inputs, with padding in the batch.
"""

from __future__ import annotations

import pytest
import torch

from moesvd_vllm.architectures import ARCHITECTURES
from offline.calibration import ExpertStatistics, ExpertStatisticsHook
from offline.layerwise import LayerwiseModel

ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "qwen3_next"]


def _first_moe_layer_run(model_dir, ids: torch.Tensor, mask: torch.Tensor):
    """(model, MoE block of the first MoE layer, its input [T, H], statistics of its experts call)."""
    model = LayerwiseModel(model_dir, compute_dtype=torch.float32)
    hidden = model.embed(ids)
    inputs = model.layer_inputs(hidden, mask)
    first = model.moe_layers[0]
    for index in range(first):
        hidden = model.run_layer(model.build_layer(index), index, hidden, inputs)
    layer = model.build_layer(first)
    block = model.moe_block(layer)
    seen: dict[str, torch.Tensor] = {}
    capture = block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    dims = model.dims
    stats = ExpertStatistics(dims.num_experts, dims.hidden, dims.intermediate, routing_weighted=True)
    hook = ExpertStatisticsHook(stats, block.experts)
    hook.token_mask = mask.reshape(-1).bool()
    model.run_layer(layer, first, hidden, inputs)
    hook.remove()
    capture.remove()
    return model, block, seen["x"].reshape(-1, dims.hidden), stats


def _router(block):
    return block.router if hasattr(block, "router") else block.gate


def _route(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k ids, their weights) from the block's own router."""
    _, weights, ids = _router(block)(x)
    return ids, weights


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_count_the_blocks_own_choice_on_real_tokens(arch, tiny_model_dir):
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # six padding positions
    model, block, x, stats = _first_moe_layer_run(tiny_model_dir(arch), ids, mask)
    real = mask.reshape(-1).bool()
    chosen, weights = _route(block, x[real])
    assert stats.total_tokens == int(mask.sum()) == 26
    counts = torch.bincount(chosen.reshape(-1), minlength=model.dims.num_experts)
    assert torch.equal(stats.routed_tokens, counts)
    assert stats.frequency.sum().item() == pytest.approx(model.dims.top_k)
    for expert in range(model.dims.num_experts):  # the Grams see the routed rows with the block's weights
        rows, row_weights = stats.routed.expert_rows(expert)
        token, slot = torch.where(chosen == expert)
        assert torch.equal(rows, x[real][token])
        assert torch.allclose(row_weights, weights[token, slot])


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHITECTURES[a].routing.correction_bias])
def test_correction_bias_moves_the_choice_but_not_the_weights(arch, tiny_model_dir):
    """DeepSeek-V3 / GLM-4.5: sigmoid scores plus the bias pick the experts (within the best groups);
    the weights are the unbiased scores of the picked experts, renormalised, times routed_scaling_factor."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    model, block, x, stats = _first_moe_layer_run(tiny_model_dir(arch), ids, torch.ones_like(ids))
    router = _router(block)
    config = model.raw_config
    chosen, weights = _route(block, x)
    scores = torch.sigmoid(x.float() @ router.weight.float().T)
    expected = scores.gather(1, chosen)
    expected = expected / expected.sum(-1, keepdim=True) * config["routed_scaling_factor"]
    assert torch.allclose(weights, expected, rtol=1e-5, atol=1e-6)
    assert config["routed_scaling_factor"] != 1.0
    bias = router.e_score_correction_bias
    assert bias.abs().min() > 0, "the fixture's correction bias must be non-zero to matter"
    saved = bias.clone()
    with torch.no_grad():
        bias.zero_()
        unbiased, _ = _route(block, x)
        bias.copy_(saved)
    moved = (chosen.sort(-1).values != unbiased.sort(-1).values).any(-1)
    assert moved.any(), "the correction bias changed no token's choice: the fixture would not test it"
    counts = torch.bincount(chosen.reshape(-1), minlength=model.dims.num_experts)
    assert torch.equal(stats.routed_tokens, counts)  # the statistics follow the biased choice


def test_multi_token_prediction_layers_are_passed_through(tiny_model_dir, tmp_path):
    """DeepSeek-V3 / GLM-4.5 store their MTP layers as model.layers.<num_hidden_layers + j>: the pipeline
    runs only the decoder layers and copies those tensors unchanged (they are not dropped)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = shutil.copytree(tiny_model_dir("deepseek_v3"), tmp_path / "with_mtp")
    tensors = load_file(str(model_dir / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    mtp = {n.replace(f"model.layers.{last}.", f"model.layers.{last + 1}."): t.clone()
           for n, t in tensors.items() if n.startswith(f"model.layers.{last}.")}
    save_file({**tensors, **mtp}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    model = LayerwiseModel(model_dir)
    copied = set(model.non_layer_tensor_names())
    assert set(mtp) <= copied
    assert not [n for n in copied if n.startswith(f"model.layers.{last}.")]
    assert model.num_layers == config["num_hidden_layers"]
