"""The magnitude neuron-pruning baseline (method "magnitude-neurons", offline/methods/magnitude.py): on the
bundled model at ratio 0.25 every expert keeps its 192 of 256 largest ||gate_i|| ||up_i|| ||down_i|| neurons,
uncompensated; the checkpoint is a normal compressed one that `evaluate_perplexity` reads; its held-out
perplexity is finite and not better than the default method's at the same ratio."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.format.schema import read_moe_svd_config
from offline.bundled import bundled_model_dir, read_split
from offline.compress import CompressionOptions, compress
from offline.eval_ppl import evaluate_perplexity
from offline.sensitivity import RatioError
from offline.slimming import magnitude_neuron_selection, magnitude_scores

logger = logging.getLogger(__name__)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calib_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "train.txt"
    path.write_text(read_split("train")[:200000], encoding="utf-8")
    return path


def _options(calib, method: str, ratio: float = 0.25) -> CompressionOptions:
    return CompressionOptions(ratio=ratio, calib=str(calib), method=method, num_samples=32, seq_len=256)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, calib_txt):
    root = tmp_path_factory.mktemp("magnitude")
    return {method: compress(bundled_model_dir(), root / method, _options(calib_txt, method))
            for method in ("magnitude-neurons", "moe-svd-stacked")}


def test_magnitude_selection_keeps_the_largest_products():
    generator = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                      for shape in ((16, 8), (16, 8), (8, 16)))
    scores = torch.stack([gate[i].norm() * up[i].norm() * down[:, i].norm() for i in range(16)])
    torch.testing.assert_close(magnitude_scores(gate, up, down), scores)
    kept = magnitude_neuron_selection(gate, up, down, 5)
    assert kept.tolist() == sorted(torch.topk(scores, 5).indices.tolist())
    assert magnitude_neuron_selection(torch.ones(4, 2), torch.ones(4, 2), torch.ones(2, 4), 2).tolist() == [0, 1]


def test_checkpoint_keeps_top_magnitude_neurons_uncompensated(compressed):
    out = compressed["magnitude-neurons"]
    block = read_moe_svd_config(out)
    assert block.method == "magnitude-neurons" and block.options["method"] == "magnitude-neurons"
    assert sorted(block.layers) == ["0", "1", "2", "3"] and abs(block.params.ratio - 0.25) < 1e-9
    dense = bundled_model_dir() / "model.safetensors"
    with safe_open(dense, "pt") as d, safe_open(next(out.glob("model-*.safetensors")), "pt") as c:
        for layer, spec in block.layers.items():
            assert spec.intermediate == 192 and spec.bank_map == list(range(8)) and not spec.bases
            for e in range(8):
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                gate, up, down = (d.get_tensor(f"{prefix}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj"))
                kept = magnitude_neuron_selection(gate, up, down, 192)
                assert torch.equal(c.get_tensor(f"{prefix}.gate_proj.weight"), gate[kept])
                assert torch.equal(c.get_tensor(f"{prefix}.up_proj.weight"), up[kept])
                assert torch.equal(c.get_tensor(f"{prefix}.down_proj.weight"), down[:, kept])  # no compensation


def test_perplexity_finite_and_not_better_than_default(compressed):
    text = read_split("validation")[:30000]
    ppl = {method: evaluate_perplexity(out, text, seq_len=256).ppl for method, out in compressed.items()}
    dense = evaluate_perplexity(bundled_model_dir(), text, seq_len=256).ppl
    logger.info("validation[:30000] perplexity at ratio 0.25: %s, dense %.3f", ppl, dense)
    assert all(math.isfinite(p) for p in ppl.values())
    assert ppl["magnitude-neurons"] >= ppl["moe-svd-stacked"], ppl


def test_ratio_needing_rank_reduction_is_refused(tmp_path, calib_txt):
    with pytest.raises(RatioError, match="removes neurons only.*at most 0.875"):
        compress(bundled_model_dir(), tmp_path / "out", _options(calib_txt, "magnitude-neurons", ratio=0.95))
    assert not (tmp_path / "out").exists()
