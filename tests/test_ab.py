"""`moesvd ab` between two real vLLM servers on loopback.

The report's numbers are checked against what the servers themselves counted on /metrics
(`vllm:generation_tokens_total`, `vllm:request_success_total` per model_name), its speed keys against
the `vllm bench serve` names, its ratios against the per-round metrics they summarise, and its quality
metrics against their exact values when both arms are the same server (delta NLL 0, top-1 agreement
100 %, KL 0, exact match 100 %).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from moesvd_vllm.cli import main as moesvd_main
from serve.ab import ABOptions, run_ab
from serve.ab_report import load_report
from serve.ab_stats import FASTER, NO_DIFFERENCE, SLOWER
from serve.http import get_text, metric_value, parse_metrics
from serve.prompts import builtin_prompts
from tests.support.ab_peers import ARM_A_ARCH
from tests.support.tolerance import served_logprob_tolerance

NUM_PROMPTS = 8
MAX_TOKENS = 16
CONCURRENCY = (1, 4)
ROUNDS = 3

VLLM_BENCH_KEYS = [
    "completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
    "request_throughput", "output_throughput", "total_token_throughput",
    *[f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
      for stat in ("mean", "median", "std", "p90", "p99")],
]


def float32_tolerance(model_dir, num_prompts: int) -> float:
    """|logprob difference| between two float32 evaluations of one model on the A/B's built-in prompts (the
    same server batched differently, or stock vs plugin): SAFETY x its float32 noise against float64
    (tests/support/tolerance.py). It bounds the mean delta NLL, log(perplexity ratio) and the top-k KL."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(prompt.text).input_ids for prompt in builtin_prompts(num_prompts=num_prompts)]
    return served_logprob_tolerance(model_dir, prompts)


def counters(server) -> dict[str, float]:
    samples = parse_metrics(get_text(server.url("/metrics")))
    return {"generation_tokens": metric_value(samples, "vllm:generation_tokens_total", model_name=server.name),
            "prompt_tokens": metric_value(samples, "vllm:prompt_tokens_total", model_name=server.name),
            "requests": metric_value(samples, "vllm:request_success_total", model_name=server.name)}


@pytest.fixture(scope="module")
def ab_run(ab_arms, tmp_path_factory):
    """One small A/B between the two arms, with the servers' counters read before and after."""
    server_a, server_b = ab_arms
    before = {"A": counters(server_a), "B": counters(server_b)}
    out = tmp_path_factory.mktemp("ab")
    report = run_ab(ABOptions(a_url=server_a.base_url, b_url=server_b.base_url, num_prompts=NUM_PROMPTS,
                              concurrency=CONCURRENCY, max_tokens=MAX_TOKENS, quality_max_tokens=8,
                              top_logprobs=5, repeats=ROUNDS, min_round_seconds=0.5, out=out,
                              show_progress=False))
    after = {"A": counters(server_a), "B": counters(server_b)}
    deltas = {arm: {k: after[arm][k] - before[arm][k] for k in before[arm]} for arm in before}
    return report, deltas, out, (server_a, server_b)


def test_report_totals_equal_what_the_servers_counted(ab_run):
    report, deltas, _, _ = ab_run
    assert report.complete, report.problems
    # per level: one warm-up wave (min(prompts, concurrency) requests), then ROUNDS rounds of the prompts
    # repeated `repetitions` times; then one quality request per prompt
    expected = NUM_PROMPTS + sum(min(NUM_PROMPTS, level["max_concurrency"]) + ROUNDS * level["requests_per_round"]
                                 for level in report.speed)
    for arm in ("A", "B"):
        accounting = report.accounting[arm]
        assert accounting["requests_succeeded"] == accounting["requests_sent"] == expected
        assert deltas[arm]["requests"] == accounting["requests_succeeded"], arm
        assert deltas[arm]["generation_tokens"] == accounting["completion_tokens"], arm
        assert deltas[arm]["prompt_tokens"] == accounting["prompt_tokens"], arm
        speed_tokens = sum(level[arm]["total_output_tokens"] for level in report.speed)
        assert speed_tokens == accounting["by_phase"]["speed"]["completion_tokens"]


def test_levels_warm_up_then_alternate_rounds_of_the_same_prompts(ab_run):
    report, _, _, _ = ab_run
    orders = [[tuple(r["order"]) for r in level["rounds"]] for level in report.speed]
    # the order alternates round after round and carries on across levels
    assert orders == [[("A", "B"), ("B", "A"), ("A", "B")], [("B", "A"), ("A", "B"), ("B", "A")]]
    for level in report.speed:
        assert level["repeats"] == ROUNDS and len(level["rounds"]) == ROUNDS
        assert level["requests_per_round"] == level["repetitions"] * NUM_PROMPTS >= NUM_PROMPTS
        assert set(level["warmup_pass_estimate_s"]) == {"A", "B"}
        fastest = min(level["warmup_pass_estimate_s"].values())
        # k = ceil(0.5 s / fastest estimated pass), at least 1
        assert level["repetitions"] == max(1, math.ceil(0.5 / fastest))
        for this_round in level["rounds"]:
            assert this_round["A"]["completed"] == this_round["B"]["completed"] == level["requests_per_round"]


def test_speed_levels_use_vllm_bench_keys_and_definitions(ab_run):
    report, _, _, _ = ab_run
    assert [level["max_concurrency"] for level in report.speed] == list(CONCURRENCY)
    for level in report.speed:
        n = level["requests_per_round"] * ROUNDS
        for arm in ("A", "B"):
            metrics = level[arm]
            assert set(VLLM_BENCH_KEYS) <= set(metrics), set(VLLM_BENCH_KEYS) - set(metrics)
            assert metrics["completed"] == n and metrics["failed"] == 0
            # ignore_eos: every request generates exactly max_tokens, counted by the server (usage)
            assert metrics["total_output_tokens"] == n * MAX_TOKENS
            assert not metrics["output_tokens_counted_from_chunks"]
            assert metrics["output_throughput"] == pytest.approx(
                metrics["total_output_tokens"] / metrics["duration"])
            assert metrics["duration"] == pytest.approx(sum(r[arm]["duration"] for r in level["rounds"]))
            assert metrics["request_throughput"] == pytest.approx(n / metrics["duration"])
            assert 0 < metrics["mean_ttft_ms"] <= metrics["mean_e2el_ms"]
            assert metrics["median_ttft_ms"] <= metrics["p99_ttft_ms"]


def test_every_ratio_is_the_median_of_the_rounds_with_its_range_and_verdict(ab_run):
    report, _, _, _ = ab_run
    for level in report.speed:
        for key, stats in level["ratios"].items():
            if stats is None:  # a zero in arm A's rounds: no ratio
                assert any(not r["A"][key] for r in level["rounds"]), key
                continue
            per_round = [r["B"][key] / r["A"][key] for r in level["rounds"]]
            assert stats["per_round"] == pytest.approx(per_round), key
            assert stats["median"] == pytest.approx(statistics.median(per_round)) == level["b_over_a"][key]
            assert stats["low"] == pytest.approx(min(per_round)) and stats["high"] == pytest.approx(max(per_round))
            if key.startswith("std_"):
                assert stats["verdict"] is None
                continue
            higher_better = not key.endswith("_ms")
            if stats["low"] > 1:
                assert stats["verdict"] == (FASTER if higher_better else SLOWER), key
            elif stats["high"] < 1:
                assert stats["verdict"] == (SLOWER if higher_better else FASTER), key
            else:
                assert stats["verdict"] == NO_DIFFERENCE, key
    assert report.metadata["speed_interval"] == {"rounds": ROUNDS, "coverage": 0.75,
                                                  "meaning": report.metadata["speed_interval"]["meaning"]}


def test_tpot_follows_vllm_definition_per_request(ab_run):
    report, _, _, _ = ab_run
    series = report.speed_series["concurrency=1"]["A"]  # every request of every round, pooled
    tpots = [(lat - ttft) / (n - 1) for lat, ttft, n in
             zip(series["latencies"], series["ttfts"], series["output_lens"]) if n > 1]
    assert report.speed_level("concurrency=1")["A"]["mean_tpot_ms"] == pytest.approx(
        1000 * sum(tpots) / len(tpots))
    # the last chunk arrives at the end-to-end time: TTFT + sum of the inter-chunk gaps
    for latency, ttft, itl in zip(series["latencies"], series["ttfts"], series["itls"]):
        assert latency == pytest.approx(ttft + sum(itl), abs=1e-6)


def test_quality_between_two_models_with_one_tokenizer(ab_run, tiny_model_dir):
    report, _, _, _ = ab_run
    quality = report.quality
    assert quality["same_tokenization"] and quality["refused"] is None
    assert quality["prompts_scored"] == NUM_PROMPTS and not quality["prompts_failed"]
    assert quality["tokens_scored_a"] == quality["tokens_scored_b"] == quality["positions_compared"] > 0
    assert 1 < quality["perplexity_a"] < math.inf and 1 < quality["perplexity_b"] < math.inf
    assert quality["perplexity_ratio"] == pytest.approx(quality["perplexity_b"] / quality["perplexity_a"])
    assert quality["mean_delta_nll"] == pytest.approx(
        math.log(quality["perplexity_b"]) - math.log(quality["perplexity_a"]), rel=1e-6)
    assert 0 <= quality["top1_agreement"] <= 100
    assert quality["kl_a_b_topk_lower_bound"] > 0  # two different random models
    # a probability mass of at most 1, from float32 logprobs: exp(their error) above at most
    assert 0 < quality["mean_shared_topk_mass_a"] <= math.exp(float32_tolerance(tiny_model_dir(ARM_A_ARCH),
                                                                                NUM_PROMPTS))
    assert quality["exact_match_rate"] is not None
    headline = report.headline()
    assert "B/A output tok/s concurrency=1: " in headline and "top-1 agreement" in headline
    stats = report.speed_level("concurrency=1")["ratios"]["output_throughput"]
    assert f"[{stats['low']:.3g}-{stats['high']:.3g}] {stats['verdict']}" in headline


def test_identical_arms_give_exact_quality_values(ab_arms, tiny_model_dir):
    server_a, _ = ab_arms
    report = run_ab(ABOptions(a_url=server_a.base_url, b_url=server_a.base_url, num_prompts=4,
                              concurrency=(2,), repeats=4, min_round_seconds=0, max_tokens=4,
                              quality_max_tokens=8, top_logprobs=5, show_progress=False))
    quality = report.quality
    assert report.complete, report.problems
    level = report.speed[0]
    assert level["order"] == ["A", "B", "B", "A", "A", "B", "B", "A"] and level["repeats"] == 4
    assert level["repetitions"] == 1  # min_round_seconds 0: each prompt once per round
    assert level["A"]["completed"] == level["B"]["completed"] == 16
    assert level["A"]["total_output_tokens"] == 16 * 4
    # the same server twice: equal up to float32 batching noise (requests may share a batch)
    tolerance = float32_tolerance(tiny_model_dir(ARM_A_ARCH), 4)
    assert quality["mean_delta_nll"] == pytest.approx(0.0, abs=tolerance)
    assert quality["top1_agreement"] == 100.0
    assert quality["kl_a_b_topk_lower_bound"] == pytest.approx(0.0, abs=tolerance)
    assert quality["exact_match_rate"] == 100.0
    assert quality["perplexity_ratio"] == pytest.approx(1.0, abs=math.expm1(tolerance))


def test_report_files_json_markdown_and_plots(ab_run):
    report, _, out, (server_a, server_b) = ab_run
    paths = {p.suffix: p for p in report.written_to}
    assert set(paths) == {".json", ".md", ".png"}
    pngs = [p for p in report.written_to if p.suffix == ".png"]
    assert {p.name.split("Z-")[-1] for p in pngs} == {"latency-cdf.png", "throughput.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    data = load_report(paths[".json"])
    assert data["complete"] is True
    meta = data["metadata"]
    for label, server in (("A", server_a), ("B", server_b)):
        assert meta["arms"][label]["url"] == server.base_url
        assert meta["arms"][label]["model"] == server.name  # discovered through /v1/models
        assert meta["arms"][label]["server_version"]  # vLLM's /version
    assert meta["prompts"]["count"] == NUM_PROMPTS and len(meta["prompts"]["sha256"]) == 64
    assert meta["prompts"]["source"].startswith("built-in")
    assert meta["options"]["concurrency"] == list(CONCURRENCY)
    markdown = paths[".md"].read_text()
    assert "| output throughput (tok/s) |" in markdown and "### Quality" in markdown
    assert "B/A median [min-max] verdict" in markdown and "holds the median ratio with probability 75 %" in markdown
    for png in pngs:
        assert f"]({png.name})" in markdown


def test_cli_prints_the_table_and_writes_the_report(ab_arms, tmp_path, capsys):
    server_a, server_b = ab_arms
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"And the LORD spake unto Moses, saying {i}"})
                                 for i in range(3)) + "\n")
    code = moesvd_main(["ab", "--a", server_a.base_url, "--b", server_b.base_url + "/v1",
                        "--prompts", str(prompts), "--request-rate", "50", "--max-tokens", "4",
                        "--min-round-seconds", "0", "--repeats", "3",
                        "--quality-max-tokens", "4", "--top-logprobs", "3", "--out", str(tmp_path / "out"),
                        "--no-plots", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Speed, request_rate=50" in printed and "output throughput (tok/s)" in printed
    assert f"A: {server_a.name} at {server_a.base_url}" in printed
    reports = list((tmp_path / "out").glob("ab-report-*.json"))
    assert len(reports) == 1
    data = json.loads(reports[0].read_text())
    assert data["metadata"]["prompts"]["source"] == f"jsonl: {prompts}"
    assert data["speed"][0]["A"]["completed"] == 3 * 3  # 3 prompts, 3 rounds
    assert data["speed"][0]["request_rate"] == 50 and data["speed"][0]["max_concurrency"] is None
    assert data["metadata"]["options"]["quality_max_tokens"] == 4 and data["metadata"]["options"]["plots"] is False


def test_dense_against_its_exact_compressed_twin(ab_arms, full_rank_twin_server, tiny_model_dir):
    """A stock dense server against the plugin serving the same function in compressed form."""
    dense, _ = ab_arms
    report = run_ab(ABOptions(a_url=dense.base_url, b_url=full_rank_twin_server.base_url, num_prompts=8,
                              concurrency=(4,), max_tokens=MAX_TOKENS, quality_max_tokens=8,
                              top_logprobs=5, repeats=3, min_round_seconds=0, show_progress=False))
    assert report.complete, report.problems
    assert report.metadata["arms"]["B"]["model"] == "qwen3_moe-full-rank"
    quality = report.quality
    assert quality["same_tokenization"]
    tolerance = float32_tolerance(tiny_model_dir("qwen3_moe"), 8)  # two float32 evaluations of one function
    assert abs(quality["mean_delta_nll"]) <= tolerance
    assert quality["kl_a_b_topk_lower_bound"] <= tolerance
    assert quality["top1_agreement"] >= 99.0
    assert quality["perplexity_ratio"] == pytest.approx(1.0, abs=math.expm1(tolerance))
    for level in report.speed:
        assert level["B"]["completed"] == 8 * 3 and level["b_over_a"]["output_throughput"] > 0
