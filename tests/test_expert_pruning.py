"""Expert pruning (offline/expert_pruning.py): the pruned checkpoint is a normal one of the same architecture
with fewer experts; on the bundled Qwen3-MoE (norm_topk_prob=True) it computes the dense model with the
pruned experts' router logits masked to -inf; REAP and frequency saliency choose as defined; bad input fails
clearly; stock vLLM serves the pruned model (slow)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

from moesvd_vllm.cli import main as moesvd_main
from moesvd_vllm.format.directories import OutputExistsError
from offline.bundled import bundled_model_dir, read_split
from offline.expert_pruning import (REPORT_FILE, ExpertPruningError, ExpertPruningOptions, experts_to_prune,
                                    kept_experts, prune_experts)
from offline.fixtures.tiny import build_tiny_checkpoint
from tests.support.tolerance import SAFETY, unit_roundoff

logger = logging.getLogger(__name__)
torch.set_num_threads(1)

PROMPTS = ["In the beginning God created the heaven and the earth.", "And the LORD spake unto Moses, saying,"]


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "train.txt"
    path.write_text(read_split("train")[:200000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, calib_txt):
    """saliency -> (out_dir, report): the bundled model pruned at ratio 0.25 (2 of 8 experts per layer)."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for saliency in ("reap", "frequency"):
        options = ExpertPruningOptions(ratio=0.25, saliency=saliency, calib=str(calib_txt))
        out[saliency] = (root / saliency, prune_experts(bundled_model_dir(), root / saliency, options))
    return out


def _ids(model_dir, prompt: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt").input_ids


def _load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}  # no float64 grouped_mm
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).eval()


class MaskedQwen3Router(nn.Module):
    """Qwen3-MoE's router (softmax, top-k, renormalised) with some experts' logits set to -inf."""

    def __init__(self, router: nn.Module, pruned: list[int]):
        super().__init__()
        self.inner = router
        self.pruned = pruned

    def forward(self, hidden_states):
        r = self.inner
        logits = nn.functional.linear(hidden_states.reshape(-1, r.hidden_dim), r.weight)
        logits[:, self.pruned] = float("-inf")
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, index = torch.topk(probs, r.top_k, dim=-1)
        if r.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index


def masked_dense(report: dict, dtype: torch.dtype) -> nn.Module:
    model = _load(bundled_model_dir(), dtype)
    for layer, entry in report["layers"].items():
        block = model.model.layers[int(layer)].mlp
        block.gate = MaskedQwen3Router(block.gate, entry["pruned"])
    return model


def test_pruned_checkpoint_has_fewer_experts_and_a_report(pruned):
    out, report = pruned["reap"]
    config = json.loads((out / "config.json").read_text())
    dense = json.loads((bundled_model_dir() / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 6
    assert {k: v for k, v in config.items() if "experts" not in k} == {k: v for k, v in dense.items()
                                                                       if "experts" not in k}
    assert report["pruned_per_layer"] == 2 and report["achieved_ratio"] == 0.25
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert (out / "tokenizer.json").read_bytes() == (bundled_model_dir() / "tokenizer.json").read_bytes()
    model = _load(out)
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 6 and layer.mlp.gate.weight.shape[0] == 6
    with safe_open(bundled_model_dir() / "model.safetensors", "pt") as dense_file:
        kept = report["layers"]["1"]["kept"]
        want = dense_file.get_tensor(f"model.layers.1.mlp.experts.{kept[3]}.down_proj.weight")
        router = dense_file.get_tensor("model.layers.1.mlp.gate.weight")
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj[3], want, rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[1].mlp.gate.weight, router[kept], rtol=0, atol=0)


def test_logits_equal_dense_with_pruned_router_logits_masked(pruned):
    """norm_topk_prob=True: removing router rows = masking their logits to -inf. Tolerance: SAFETY x the
    masked model's measured float32 noise (against its float64 evaluation) plus both sides' rounding."""
    out, report = pruned["reap"]
    model, reference, reference64 = _load(out), masked_dense(report, torch.float32), masked_dense(report, torch.float64)
    for prompt in PROMPTS:
        ids = _ids(out, prompt)
        with torch.no_grad():
            got, want, exact = model(ids).logits, reference(ids).logits, reference64(ids).logits
        tolerance = SAFETY * float((want.double() - exact).abs().max()) + 2 * unit_roundoff(torch.float32) * float(
            exact.abs().max())
        difference = float((got - want).abs().max())
        logger.info("pruned vs masked dense: max |logit difference| %.2e (tolerance %.2e)", difference, tolerance)
        assert difference <= tolerance, (prompt, difference, tolerance)
        with torch.no_grad():
            dense = _load(bundled_model_dir())(ids).logits
        assert float((got - dense).abs().max()) > 100 * tolerance  # pruning changes the logits


def test_reap_and_frequency_choose_as_defined_and_differ(pruned):
    reap, frequency = pruned["reap"][1], pruned["frequency"][1]
    for report in (reap, frequency):
        for entry in report["layers"].values():
            low = sorted(range(8), key=lambda e: (entry["saliency"][e], -e))[:2]
            assert sorted(low) == entry["pruned"] and entry["kept"] == sorted(set(range(8)) - set(low))
    for layer, entry in reap["layers"].items():
        assert entry["saliency"] == entry["reap"] == frequency["layers"][layer]["reap"]
        assert frequency["layers"][layer]["saliency"] == entry["frequency"]
    differing = [layer for layer in reap["layers"] if reap["layers"][layer]["kept"] != frequency["layers"][layer]["kept"]]
    assert differing, "REAP and frequency kept the same experts in every layer"
    # where they differ, REAP kept a rarely routed expert whose weighted output is large (and vice versa)
    layer = differing[0]
    only_reap = set(reap["layers"][layer]["kept"]) - set(frequency["layers"][layer]["kept"])
    only_freq = set(frequency["layers"][layer]["kept"]) - set(reap["layers"][layer]["kept"])
    entry = reap["layers"][layer]
    assert min(entry["reap"][e] for e in only_reap) >= max(entry["reap"][e] for e in only_freq)
    assert max(entry["frequency"][e] for e in only_reap) <= min(entry["frequency"][e] for e in only_freq)


def test_kept_experts_and_count_rules():
    assert kept_experts([3.0, 1.0, 2.0, 1.0], 2) == [0, 2]  # ties: the higher id goes
    assert experts_to_prune(0.25, 8, 2) == 2
    assert experts_to_prune(0.01, 8, 2) == 1  # at least one expert
    assert experts_to_prune(0.75, 8, 2) == 6  # exactly top_k left
    with pytest.raises(ExpertPruningError, match="top_k 2.*at most 0.750"):
        experts_to_prune(0.9, 8, 2)


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "mixtral"])
def test_tiny_fixtures_prune_and_load(arch, tmp_path, calib_txt):
    """Other layouts of the architecture table: renamed experts, router rows, shared experts kept."""
    model_dir = build_tiny_checkpoint(arch, tmp_path / arch, seed=0)
    options = ExpertPruningOptions(ratio=0.5, saliency="frequency", calib=str(calib_txt), num_samples=4, seq_len=64)
    report = prune_experts(model_dir, tmp_path / "out", options)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    assert config[key] == 4 and report["experts_per_layer"] == 4
    model = _load(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.arange(1, 17)[None]).logits
    assert torch.isfinite(logits).all()
    dense = _load(model_dir)
    for index, entry in report["layers"].items():
        block, dense_block = (m.get_submodule(f"model.layers.{index}.mlp") for m in (model, dense))
        assert block.experts.gate_up_proj.shape[0] == 4
        torch.testing.assert_close(block.experts.gate_up_proj, dense_block.experts.gate_up_proj[entry["kept"]])
        if arch == "qwen2_moe":
            for name, tensor in dense_block.shared_expert.state_dict().items():
                torch.testing.assert_close(block.shared_expert.state_dict()[name], tensor, rtol=0, atol=0)
            torch.testing.assert_close(block.shared_expert_gate.weight, dense_block.shared_expert_gate.weight)


def test_bad_input_fails_clearly(tmp_path, calib_txt, pruned):
    calib = str(calib_txt)
    for ratio in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ExpertPruningError, match="ratio must be strictly between 0 and 1"):
            ExpertPruningOptions(ratio=ratio, saliency="reap", calib=calib)
    with pytest.raises(ExpertPruningError, match="saliency 'magnitude' is not one of"):
        ExpertPruningOptions(ratio=0.25, saliency="magnitude", calib=calib)
    with pytest.raises(ExpertPruningError, match=r"unknown expert-pruning option\(s\) \['rate'\]; known"):
        ExpertPruningOptions.from_dict({"ratio": 0.25, "saliency": "reap", "calib": calib, "rate": 1})
    with pytest.raises(ExpertPruningError, match="leaving 1 < top_k 2"):
        prune_experts(bundled_model_dir(), tmp_path / "x", ExpertPruningOptions(ratio=0.9, saliency="reap", calib=calib))
    existing = pruned["frequency"][0]
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        prune_experts(bundled_model_dir(), existing, ExpertPruningOptions(ratio=0.25, saliency="reap", calib=calib))
    other = tmp_path / "deepseek"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    with pytest.raises(ExpertPruningError, match="supports model types .* not 'deepseek_v2'"):
        prune_experts(other, tmp_path / "y", ExpertPruningOptions(ratio=0.25, saliency="reap", calib=calib))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_prune_experts(tmp_path, calib_txt, capsys):
    args = ["prune-experts", str(bundled_model_dir()), "--out", str(tmp_path / "out"), "--ratio", "0.5",
            "--saliency", "frequency", "--calib", str(calib_txt), "--num-samples", "8", "--seq-len", "128"]
    assert moesvd_main(args) == 0
    assert "4 of 8 experts per MoE layer kept" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 4
    assert moesvd_main(args) == 1  # exists, no --force
    assert "already exists" in capsys.readouterr().out
    assert moesvd_main(args + ["--force"]) == 0


@pytest.mark.slow
def test_stock_vllm_serves_pruned_bundled_model(pruned, vllm_server):
    """Stock vLLM (no moesvd plugin: the pruned checkpoint keeps Qwen3MoeForCausalLM) serves the pruned
    model; its greedy tokens equal transformers' on the same checkpoint."""
    from serve.http import post_json
    from tests.test_vllm_serving_stock import transformers_greedy

    out, _ = pruned["reap"]
    server = vllm_server(out)
    prompt, steps = PROMPTS[0], 8
    response = post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": prompt, "max_tokens": steps, "temperature": 0.0, "logprobs": 1,
        "ignore_eos": True, "return_tokens_as_token_ids": True})
    tokens = [int(t.removeprefix("token_id:")) for t in response["choices"][0]["logprobs"]["tokens"]]
    want, _ = transformers_greedy(out, prompt, steps)
    assert tokens == want, f"vLLM {tokens} vs transformers {want}"
