"""The results protocol (offline/results_protocol.py): scores, bootstrap intervals, the report, one real cell."""

from __future__ import annotations

import json

import pytest
import torch

from offline.bundled import bundled_model_dir
from offline.bundled.evaluate import load_model
from offline.protocol_report import BEGIN, END, summarize, validation_winners, write_report
from offline.protocol_scores import bootstrap_ppl_ratio, score_windows
from offline.results_protocol import VARIANTS, eval_windows, run_model


def test_bootstrap_of_identical_windows_is_exactly_one():
    nll = [100.0, 120.0, 90.0, 130.0]
    assert bootstrap_ppl_ratio(nll, nll, tokens_per_window=255) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_holds_the_point_and_excludes_one_for_a_uniform_shift():
    generator = torch.Generator().manual_seed(0)
    base = (torch.rand(40, generator=generator) * 50 + 500).tolist()
    shifted = [value + 10.0 + noise for value, noise in zip(base, torch.randn(40, generator=generator).tolist())]
    ratio, low, high = bootstrap_ppl_ratio(shifted, base, tokens_per_window=100)
    assert low < ratio < high
    assert low > 1.0  # every window is worse by about 0.1 nats/token
    assert ratio == pytest.approx(torch.tensor(0.1).exp().item(), rel=0.01)
    with pytest.raises(ValueError, match="same windows"):
        bootstrap_ppl_ratio(base, base[:-1], 100)


def test_the_dense_model_against_itself_has_zero_kl_and_full_agreement():
    model = load_model(bundled_model_dir())
    windows = eval_windows(bundled_model_dir(), ("kjv",), per_text=2)["test"]["kjv"]
    alone = score_windows(model, windows, None)
    from offline.protocol_scores import next_token_logprobs

    against = score_windows(model, windows, next_token_logprobs(model, windows))
    assert against.nll == alone.nll and against.top1 == [1.0, 1.0]
    assert max(abs(value) for value in against.kl) < 1e-6  # float32 log-probs, float64 sums


def test_one_real_cell_end_to_end_and_the_report_between_its_markers(tmp_path):
    """The default and whitened SVD at 40 % on moe_mini (8 calibration windows, 2 evaluation windows per
    text): JSON cells, then the tables."""
    results, out = {"models": {}}, tmp_path / "results.json"
    variants = (VARIANTS[0], next(v for v in VARIANTS if v.method == "whitened-svd"))
    run_model("moe_mini", results, out, tmp_path / "work", variants, [0.4], [0], windows_per_text=2,
              calib_samples=8)
    saved = json.loads(out.read_text())
    cells = saved["models"]["moe_mini"]["cells"]
    assert [c["variant"] for c in cells] == [v.label for v in variants]
    assert abs(cells[1]["achieved_ratio"] - cells[0]["achieved_ratio"]) <= 0.05  # same parameter count
    entry = saved["models"]["moe_mini"]
    rows = summarize(entry, "test")[0.4]
    assert rows[variants[0].label]["in_vs_dense"]["ratio"] > 1.0  # compression costs something
    assert "in_vs_default" in rows[variants[1].label]
    assert validation_winners(entry)[0.4] in rows
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nbefore\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    write_report(saved, doc)
    text = doc.read_text()
    assert "old" not in text and text.startswith("# Results\n\nbefore") and text.endswith("after\n")
    assert "### moe_mini: calibrated on kjv" in text and "whitened SVD" in text
    write_report(saved, doc)
    assert doc.read_text() == text  # regenerating is idempotent


def test_runs_of_other_ratios_merge_and_runs_of_other_windows_do_not():
    """Runs merge when their dense scores are the same windows: equal up to float32 summation order (another
    thread count moves a window's NLL by ~1e-7 relative), not when a window differs."""
    from offline.results_protocol import merge_results

    def run(ratio, nll):
        cell = {"variant": VARIANTS[0].label, "ratio": ratio, "seed": 0, "scores": {}}
        dense = {"test": {"kjv": {"nll": nll}}}
        return {"models": {"moe_fine": {"dense": dense, "calib_source": "python-docs", "cells": [cell]}}}

    windows = [512.25, 498.5]
    results = run(0.4, windows)
    merge_results(results, run(0.6, windows))
    merge_results(results, run(0.6, windows))  # the same cell twice is kept once
    merge_results(results, run(0.5, [w * (1 + 6e-7) for w in windows]))  # another thread count
    assert [c["ratio"] for c in results["models"]["moe_fine"]["cells"]] == [0.4, 0.6, 0.5]
    with pytest.raises(ValueError, match="different evaluation windows"):
        merge_results(results, run(0.2, [512.25, 470.0]))


def test_selection_score_counts_out_of_domain_gains_as_one_and_per_expert_svd_is_not_servable():
    from offline.protocol_report import selection_score

    assert selection_score({"in_vs_dense": {"ratio": 1.05}, "ood_vs_dense": {"ratio": 0.9}}) == (1.05, 1.05)
    assert selection_score({"in_vs_dense": {"ratio": 0.99}, "ood_vs_dense": {"ratio": 0.9}}) == (1.0, 0.99)
    assert {v.method for v in VARIANTS if not v.servable} == {"svd", "whitened-svd"}
