"""The performance benchmark runs end to end on a tiny configuration (no speed is asserted here: speed
targets live in benchmarks/run_perf.py's output and docs/performance.md, never in unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import perf_models, perf_report
from moesvd_vllm.architectures import MoEDims
from moesvd_vllm.format.schema import LayerSpec, decomposed_layer_params, dense_layer_params

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


def test_bounds_of_a_neuron_selection_layer():
    """Format v2: I' kept neurons at r = H without bases: every bound is I / I' (the schema's count)."""
    spec = LayerSpec(form="shared_basis", rank=2048, num_experts=128, bank_map=list(range(128)),
                     basis_dtype="bfloat16", intermediate=464, bases=False)
    geometry = perf_report.LayerGeometry.from_spec(QWEN3_30B, spec)
    assert geometry.factor_params() == decomposed_layer_params(spec, QWEN3_30B) == 128 * 3 * 464 * 2048
    assert geometry.bytes_ideal() == pytest.approx(768 / 464)
    assert geometry.touched_bytes_bound(1) == pytest.approx(768 / 464)
    assert geometry.flop_bound() == pytest.approx(768 / 464)
    rank_only = LayerSpec(form="shared_basis", rank=1216, num_experts=128, bank_map=list(range(128)),
                          basis_dtype="bfloat16")
    model = perf_report.ModelGeometry.from_specs(QWEN3_30B, [spec, rank_only])
    dense = 2 * dense_layer_params(QWEN3_30B)
    compressed = decomposed_layer_params(spec, QWEN3_30B) + decomposed_layer_params(rank_only, QWEN3_30B)
    assert model.bytes_ideal() == pytest.approx(dense / compressed)
    assert perf_report.layer_shape_label(QWEN3_30B, [spec]) == "I'=464, no bases"
    assert perf_report.layer_shape_label(QWEN3_30B, [rank_only]) == "r=1216"
    padded = geometry.padded()  # vLLM's x86 fused-MoE kernel runs I' = 464 as 480
    assert padded.intermediate == 480 and padded.bytes_ideal() == pytest.approx(768 / 480)
    assert perf_report.LayerGeometry.from_spec(QWEN3_30B, rank_only).padded().intermediate == 768


def test_neuron_selection_shape_of_a_ratio():
    """--neuron-ratios: I' is the multiple of 8 nearest (1 - ratio) I, at r = H without bases."""
    assert perf_models.synthetic_shape(QWEN3_30B, 0.4, neurons=True) == perf_models.SyntheticShape(
        rank=2048, intermediate=464, bases=False)
    assert perf_models.synthetic_shape(QWEN3_30B, 0.6, neurons=True).intermediate == 304
    assert perf_models.synthetic_shape(QWEN3_30B, 0.4, neurons=False) == perf_models.SyntheticShape(rank=1216)


def test_expert_bases_shape_of_a_ratio():
    """--expert-bases-ratios: r (2 E H + 3 E I) = (1 - ratio) 3 E I H, rounded to 32 (Qwen3-30B-A3B: 442 -> 448)."""
    assert perf_models.synthetic_shape(QWEN3_30B, 0.4, neurons=False, expert_bases=True) == \
        perf_models.SyntheticShape(rank=448, basis_groups=128)


@pytest.mark.slow  # several vLLM engines, about 3.5 min here
def test_run_perf_tiny(tmp_path):
    """`run_perf.py --tiny`: tiny fixture, 1 layer, ratio 0.4 by the real compressor, by neuron selection
    (synthetic, format v2: no bases) and with every expert's own bases (synthetic, format v4), offline
    engines and a served A/B (the first pair)."""
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
    # the worker holds exactly the expert parameters the checkpoint's metadata promises (with the
    # kernel's padding of kept intermediate neurons: the compressor's default selects neurons first)
    assert abs(pair["weights"]["deviation_from_padded"]) < 1e-9
    assert abs(results["summary"]["dense_weights"]["deviation"]) < 1e-9
    assert results["compression"][0]["peak_rss_bytes"] > 0
    description = results["offline"]["pairs"][0]["compressed"]["description"]
    assert description["quant_method"] == "SharedBasisExperts"  # the plugin's method on vLLM's own block
    neurons = results["summary"]["pairs"][1]
    assert neurons["variant"] == "0.4-neurons" and not neurons["bases"] and neurons["intermediate"] == 80
    assert neurons["ideal_bytes_ratio"] == pytest.approx(128 / 80)
    neuron_metrics = {row["metric"]: row for row in neurons["rows"]}
    assert neuron_metrics["MoE block ms @32 tok"]["compressed"] > 0
    # vLLM's x86 kernel pads I' = 80 to 96: resident = the schema's count with I' padded
    assert neurons["padded_ideal_bytes_ratio"] == pytest.approx(128 / 96)
    assert abs(neurons["weights"]["deviation_from_padded"]) < 1e-9
    experts = results["summary"]["pairs"][2]  # format v4: every expert its own bases, the grouped path
    assert experts["variant"] == "0.4-expert-bases" and experts["bases"]
    expert_metrics = {row["metric"]: row for row in experts["rows"]}
    assert expert_metrics["MoE block ms @32 tok"]["compressed"] > 0
    assert abs(experts["weights"]["deviation_from_padded"]) < 1e-9
    assert "| ratio (layer shape) |" in (out / "perf.md").read_text()
