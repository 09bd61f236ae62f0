"""Dynamic expert skipping (issue 16): the rule, its metadata, the compressor's betas, the served model
against the PyTorch reference with the same rule, and the /metrics counters.

The served tests use the bundled model (trained: its routing is far from uniform, so skipping changes the
output) with betas chosen to skip half of the non-top-1 pairs on calibration data: a skip-only checkpoint
(dense MoE layers on vLLM's own kernel) and a compressed one (shared-basis layers and a dense one).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from moesvd_vllm.format.schema import MoESVDConfig, SchemaError
from moesvd_vllm.skipping import (
    SkippingError,
    combine_pairs,
    keep_mask,
    kept_pairs,
    kept_weights,
    resolve_betas,
)
from serve.http import get_text
from tests.support.plugin import (
    float32_tolerance,
    max_logprob_difference,
    prompt_token_ids,
    reference_score,
    same_greedy_tokens,
    score,
)

BUNDLED = Path(__file__).resolve().parents[1] / "offline" / "bundled" / "moe_mini"
CALIB = BUNDLED.parent / "kjv_text" / "validation.txt"
TARGET = 0.5  # skip half of the non-top-1 pairs of the calibration data


# ------------------------------------------------------------------------------------------ the rule
def test_rule_keeps_top1_and_renormalises_like_the_seed():
    torch.manual_seed(0)
    logits = torch.randn(64, 16)
    probs = logits.softmax(-1)
    top, ids = probs.topk(4, dim=-1)
    renormalised = top / top.sum(-1, keepdim=True)  # what a norm_topk_prob router hands the experts
    beta = 0.5
    keep = keep_mask(renormalised, beta)
    assert keep[:, 0].all() and (~keep).any()
    # the seed (002): mask softmax probabilities below beta * top-1, then renormalise over the kept ones
    seed = top.masked_fill(top < beta * top[:, :1], 0.0)
    seed = seed / seed.sum(-1, keepdim=True)
    torch.testing.assert_close(kept_weights(renormalised, keep, renormalize=True), seed)
    # a router that does not renormalise: the kept weights stay as they were
    torch.testing.assert_close(kept_weights(top, keep_mask(top, beta), renormalize=False),
                               top * (top >= beta * top[:, :1]))
    assert keep_mask(top, 0.0).all() and keep_mask(top, 1.0).sum().item() == 64


def test_kept_pairs_compute_the_masked_weighted_sum():
    torch.manual_seed(1)
    hidden, experts = torch.randn(10, 8), torch.randn(6, 8, 8)
    weights, ids = torch.rand(10, 3).sort(-1, descending=True).values, torch.randint(0, 6, (10, 3))
    keep = keep_mask(weights, 0.6)
    pairs = kept_pairs(hidden, weights, ids, keep)
    assert pairs.ids.shape == (int(keep.sum()), 1) < (30, 1)
    rows = torch.einsum("ph,pho->po", pairs.hidden, experts[pairs.ids[:, 0]]) * pairs.weights
    expected = sum(torch.einsum("th,tho->to", hidden, experts[ids[:, j]]) * (weights[:, j] * keep[:, j])[:, None]
                   for j in range(3))
    torch.testing.assert_close(combine_pairs(rows, pairs), expected)


# ------------------------------------------------------------------------------------------ metadata
def _block(betas) -> dict:
    return {"format_version": 3, "method": "skip-only", "original_architectures": ["Qwen3MoeForCausalLM"],
            "layers": {}, "params": {"expert_dense": 10, "expert_compressed": 10},
            "skipping": {"betas": betas, "selection": "fixed"}}


@pytest.mark.parametrize("beta", [-0.1, 1.5, "0.3", True])
def test_bad_beta_in_metadata_is_refused(beta):
    with pytest.raises(SchemaError, match=r"skipping\.betas\.0: beta must be a number in \[0, 1\].*MOESVD_SKIP_BETA"):
        MoESVDConfig.from_dict(_block({"0": beta}))


def test_wrong_layer_count_is_refused():
    spec = MoESVDConfig.from_dict(_block({"0": 0.2, "1": 0.3})).skipping
    with pytest.raises(SchemaError, match=r"2 beta\(s\) for layers \[0, 1\].*MoE layers are \[0, 1, 2, 3\]"):
        spec.validate_layers([0, 1, 2, 3], "moe_svd.skipping")


def test_skipping_needs_format_3():
    block = _block({"0": 0.2})
    block["format_version"] = 2
    with pytest.raises(SchemaError, match="format_version >= 3"):
        MoESVDConfig.from_dict(block)


@pytest.mark.parametrize("override,expected", [("0.25", {0: 0.25, 1: 0.25}), ("off", {}),
                                               ('{"1": 0.4}', {0: 0.1, 1: 0.4}), ("", {0: 0.1, 1: 0.2})])
def test_server_start_override(override, expected):
    assert resolve_betas({"0": 0.1, "1": 0.2}, [0, 1], override) == expected


@pytest.mark.parametrize("override,message", [("-1", "outside"), ("1.01", "outside"), ("x", "not a number"),
                                              ('{"7": 0.2}', "not MoE layers")])
def test_bad_server_start_override_is_refused(override, message):
    with pytest.raises(SkippingError, match=message):
        resolve_betas({"0": 0.1, "1": 0.2}, [0, 1], override)


def test_bad_compressor_option_is_refused():
    from offline.compression_options import CompressionOptions, OptionsError

    with pytest.raises(OptionsError, match="outside"):
        CompressionOptions(ratio=0.5, calib=str(CALIB), skip_beta="1.2")
    with pytest.raises(OptionsError, match=r"skip-target must be in \[0, 1\)"):
        CompressionOptions(ratio=0.5, calib=str(CALIB), skip_target=1.0)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def skip_only_checkpoint(tmp_path_factory) -> Path:
    from offline.cli_skip import SkipOptions, add_skipping

    options = SkipOptions(calib=str(CALIB), skip_target=TARGET, num_samples=16, seq_len=128)
    return add_skipping(BUNDLED, tmp_path_factory.mktemp("skip") / "skip-only", options)


def test_compressor_betas_reach_the_target(skip_only_checkpoint):
    spec = json.loads((skip_only_checkpoint / "config.json").read_text())["moe_svd"]["skipping"]
    assert sorted(spec["betas"]) == ["0", "1", "2", "3"] and spec["selection"] == "target_fraction"
    # the quantile of a finite sample: within one pair of the target
    pairs = 16 * 128
    assert all(abs(f - TARGET) <= 1 / pairs + 1e-9 for f in spec["calibration_skip_fraction"].values())


def test_reference_applies_the_rule(skip_only_checkpoint):
    from offline.reference import load_reference_model
    from offline.skipping import SkippingExperts

    skipping = load_reference_model(skip_only_checkpoint)
    assert all(isinstance(layer.mlp.experts, SkippingExperts) for layer in skipping.model.layers)
    plain = load_reference_model(skip_only_checkpoint, skip_beta="off")
    assert not any(isinstance(layer.mlp.experts, SkippingExperts) for layer in plain.model.layers)


def test_quality_tool_counts_skips_and_measures_the_cost(skip_only_checkpoint):
    from offline.skip_quality import evaluate

    text = (CALIB.parent / "test.txt").read_text(encoding="utf-8")
    rows = evaluate(str(skip_only_checkpoint), text, [0, "stored", 1.0], seq_len=64, max_tokens=1024)
    off, stored, top1_only = rows
    assert off["skip_fraction"] == 0 and off["kl"] == 0 and off["top1_agreement"] == 1
    # beta 1 keeps only the top-1 expert (ties have measure zero); the stored betas target TARGET on
    # calibration text, so on other text of the same domain they skip a share near it (16 x 128 calibration
    # pairs against 1,024 scored tokens: a loose band)
    assert top1_only["skip_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert abs(stored["skip_fraction"] - TARGET) < 0.15
    assert 0 < stored["kl"] < top1_only["kl"] and stored["ppl"] < top1_only["ppl"]


# ------------------------------------------------------------------------------------------ served
def _metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model_name="{re.escape(model)}"}} ([0-9.e+]+)$', text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _served_against_reference(model_dir: Path, server) -> None:
    from offline.reference import load_reference_model

    served = score(server, prompt_token_ids(model_dir))
    ids = prompt_token_ids(model_dir)
    reference = reference_score(load_reference_model(model_dir).eval(), ids)
    assert same_greedy_tokens(served, reference), "greedy tokens differ from the reference with the same rule"
    tolerance = float32_tolerance(model_dir, served)
    assert max_logprob_difference(served, reference) <= tolerance
    # the test can fail: the reference WITHOUT skipping is far from the served model
    unskipped = reference_score(load_reference_model(model_dir, skip_beta="off").eval(), ids)
    assert max_logprob_difference(served, unskipped) > 10 * tolerance


def _skip_counters(server) -> tuple[float, float]:
    text = get_text(server.url("/metrics"))
    return (_metric(text, "moesvd_routed_pairs_total", server.name),
            _metric(text, "moesvd_skipped_pairs_total", server.name))


def test_served_skip_only_matches_reference_and_counts(skip_only_checkpoint, vllm_server):
    server = vllm_server(skip_only_checkpoint)
    _served_against_reference(skip_only_checkpoint, server)
    deadline = time.monotonic() + 30
    while True:  # the stat logger folds the workers' counts in at its next engine iteration
        routed, skipped = _skip_counters(server)
        if routed > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    # 2 experts per token: skipped <= non-top-1 pairs = routed / 2; about half of them on KJV text
    assert routed > 0 and 0.15 * routed / 2 < skipped < 0.85 * routed / 2


@pytest.fixture(scope="module")
def compressed_skip_checkpoint(tmp_path_factory) -> Path:
    from offline.compress import CompressionOptions, compress

    options = CompressionOptions(calib=str(CALIB), num_samples=8, seq_len=64, batch_size=4, method="moe-svd",
                                 ratio=0.5, ratio_tolerance=0.05, min_intermediate_fraction=0.5,
                                 skip_target=TARGET)
    return compress(BUNDLED, tmp_path_factory.mktemp("skip") / "compressed-skip", options)


@pytest.mark.slow  # ~3 min; the default suite serves skipping through the skip-only checkpoint above
def test_served_compressed_with_skipping_matches_reference(compressed_skip_checkpoint, vllm_server):
    block = json.loads((compressed_skip_checkpoint / "config.json").read_text())["moe_svd"]
    assert block["layers"] and len(block["layers"]) < 4 and block["format_version"] == 3  # decomposed + dense
    _served_against_reference(compressed_skip_checkpoint, vllm_server(compressed_skip_checkpoint))


@pytest.fixture(scope="module")
def grouped_skip_checkpoint(tmp_path_factory) -> Path:
    from offline.compress import CompressionOptions, compress

    options = CompressionOptions(calib=str(CALIB), num_samples=8, seq_len=64, batch_size=4, ratio=0.5,
                                 ratio_tolerance=0.05, basis_groups=4, min_intermediate_fraction=1.0,
                                 skip_target=TARGET)
    return compress(BUNDLED, tmp_path_factory.mktemp("skip") / "grouped-skip", options)


@pytest.mark.slow  # ~3 min
def test_served_group_wise_bases_with_skipping_match_reference(grouped_skip_checkpoint, vllm_server):
    """Format version 4 (group-wise bases) with skipping: only the kept pairs become rows of the grouped
    path (moesvd_vllm/grouped_bases.py)."""
    block = json.loads((grouped_skip_checkpoint / "config.json").read_text())["moe_svd"]
    assert block["format_version"] == 4 and block["skipping"] is not None
    assert all(layer["basis_groups"] == 4 for layer in block["layers"].values())
    _served_against_reference(grouped_skip_checkpoint, vllm_server(grouped_skip_checkpoint))

