"""The performance benchmark runs end to end on a tiny configuration (no speed is asserted here: speed
targets live in benchmarks/run_perf.py's output and docs/performance.md, never in unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import perf_report
from moesvd_vllm.schema import MoEDims

REPO_ROOT = Path(__file__).resolve().parent.parent

QWEN3_30B = MoEDims(num_experts=128, top_k=8, hidden=2048, intermediate=768)


def test_bounds_of_the_qwen3_layer_geometry():
    """The ideal ratios the table prints beside each measurement (pure arithmetic, no timing)."""
    full = perf_report.LayerGeometry(QWEN3_30B, rank=2048)
    assert full.bytes_ideal() < 1.0  # full rank plus bases is larger than dense
    geometry = perf_report.LayerGeometry(QWEN3_30B, rank=1216)
    assert geometry.bytes_ideal() == pytest.approx(128 * 3 * 768 * 2048 / (2 * 1216 * 2048 + 128 * 3 * 768 * 1216))
    assert geometry.touched_experts(1) == pytest.approx(8)
    assert geometry.touched_experts(512) == pytest.approx(128, rel=1e-6)
    assert geometry.touched_bytes_bound(512) == pytest.approx(geometry.bytes_ideal(), rel=1e-6)
    assert geometry.touched_bytes_bound(1) < geometry.touched_bytes_bound(32) < geometry.bytes_ideal()
    assert geometry.flop_bound() < geometry.bytes_ideal()  # bases cost per token, not per expert
    fp32_bases = perf_report.LayerGeometry(QWEN3_30B, rank=1216, basis_bytes=4.0)
    assert fp32_bases.bytes_ideal() < geometry.bytes_ideal()


def test_run_perf_tiny(tmp_path):
    """`run_perf.py --tiny`: tiny fixture, 1 layer, one ratio, offline engines and a served A/B."""
    out = tmp_path / "perf"
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "run_perf.py"), "--tiny",
                                "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=1200)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "perf.json").read_text())
    pair = results["summary"]["pairs"][0]
    metrics = {row["metric"]: row for row in pair["rows"]}
    for name in ("MoE block ms @1 tok", "MoE block ms @32 tok", "offline out tok/s @batch 1",
                 "offline out tok/s @batch 4", "served out tok/s @conc 4"):
        assert metrics[name]["dense"] > 0 and metrics[name]["compressed"] > 0, name
    # the worker holds exactly the expert parameters the checkpoint's metadata promises
    assert abs(pair["weights"]["deviation"]) < 1e-9
    assert abs(results["summary"]["dense_weights"]["deviation"]) < 1e-9
    assert results["compression"][0]["peak_rss_bytes"] > 0
    description = results["offline"]["pairs"][0]["compressed"]["description"]
    assert description["block_class"] == "LowRankSharedBasisMoE"
    assert "| ratio (rank) |" in (out / "perf.md").read_text()
