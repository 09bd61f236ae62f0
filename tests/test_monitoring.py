"""Tokens/s monitoring: /metrics scrapes, a real Prometheus with the shipped files, and `moesvd monitor`.

The Prometheus test runs the Debian `prometheus` binary on loopback with serve/prometheus/ (targets
and intervals substituted: 1 s scrapes and rule evaluations), scraping the two real vLLM arms while a
bounded load runs, and reads tokens/s per model_name from the shipped recording rule.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from moesvd_vllm.cli import main as moesvd_main
from serve.http import post_json
from serve.launch import free_port
from serve.vllm_metrics import (GENERATION_TOKENS, TTFT_BUCKET, MetricsWatcher, buckets_by_model,
                                histogram_quantile, prometheus_query, rates_between, rates_from_prometheus,
                                scrape, values_by_model)

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "serve" / "prometheus"
SHIPPED = ("prometheus.yml", "recording_rules.yml", "alert_rules.yml")
DENSE_PLACEHOLDER, COMPRESSED_PLACEHOLDER = "127.0.0.1:8000", "127.0.0.1:8001"


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: run `.ci/install --dev` (Debian package `prometheus`)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def host_port(server) -> str:
    return server.base_url.split("://", 1)[1]


def complete(server, max_tokens: int = 16) -> dict:
    return post_json(server.url("/v1/completions"), {
        "model": server.name, "prompt": "And God saw the light, that it was good:", "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True})


class BoundedLoad:
    """Sends completions to the given servers in turn from one thread, until stopped or `max_requests`."""

    def __init__(self, servers, max_requests: int = 400, max_seconds: float = 240.0):
        self.servers, self.max_requests, self.max_seconds = servers, max_requests, max_seconds
        self.sent = 0
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while (not self.stop_event.is_set() and self.sent < self.max_requests
               and time.monotonic() - started < self.max_seconds):
            server = self.servers[self.sent % len(self.servers)]
            self.sent += 1
            try:
                complete(server)
            except Exception as err:  # keep loading; the test reports the errors
                self.errors.append(repr(err))

    def __enter__(self) -> "BoundedLoad":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=120)


# ---------------------------------------------------------------- shipped files


def test_promtool_accepts_the_shipped_config_and_rules():
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", "recording_rules.yml", "alert_rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 11 rules found" in rules.stdout and "SUCCESS: 3 rules found" in rules.stdout


def test_alert_rules_fire_as_documented():
    result = promtool("test", "rules", "alert_rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rule_tests_catch_a_wrong_threshold(tmp_path):
    for name in SHIPPED[1:]:
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    (tmp_path / "alert_rules.yml").write_text(
        (PROMETHEUS_DIR / "alert_rules.yml").read_text().replace(
            "model_name:vllm_time_to_first_token_seconds:p99_5m > 2", "model_name:vllm_time_to_first_token_seconds:p99_5m > 10"))
    shutil.copy(PROMETHEUS_DIR / "alert_rules_test.yml", tmp_path / "alert_rules_test.yml")
    result = promtool("test", "rules", "alert_rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "VLLMTimeToFirstTokenP99High" in result.stdout + result.stderr


# ---------------------------------------------------------------- /metrics


def test_rates_from_two_scrapes_count_exactly_what_was_sent(ab_arms):
    server_a, server_b = ab_arms
    before = {s.name: scrape(s.base_url) for s in ab_arms}
    usages = [complete(server_a, max_tokens=16)["usage"] for _ in range(3)]
    after = {s.name: scrape(s.base_url) for s in ab_arms}
    rates = rates_between(before[server_a.name], after[server_a.name])[server_a.name]
    assert rates.generation_tokens_per_s * rates.interval_s == pytest.approx(48)
    assert rates.requests_per_s * rates.interval_s == pytest.approx(3)
    assert rates.prompt_tokens_per_s * rates.interval_s == pytest.approx(sum(u["prompt_tokens"] for u in usages))
    assert rates.ttft_p99_s is not None and rates.ttft_p99_s > 0
    assert rates.requests_running == 0 and rates.requests_waiting == 0
    idle = rates_between(before[server_b.name], after[server_b.name])[server_b.name]
    assert idle.generation_tokens_per_s == 0 and idle.ttft_p99_s is None


def test_monitor_cli_reads_live_tokens_per_second(ab_arms, capsys):
    server_a, server_b = ab_arms
    with BoundedLoad([server_a], max_seconds=60) as load:
        watcher = MetricsWatcher([server_a.base_url, server_b.base_url])
        watcher.poll()
        deadline = time.monotonic() + 45  # inside the load's 60 s; a slow machine may need several rounds
        rates, problems = {}, []
        while time.monotonic() < deadline and not problems:
            time.sleep(3)
            rates, problems = watcher.poll()
            if server_a.name in rates and rates[server_a.name].generation_tokens_per_s > 0:
                break
        code = moesvd_main(["monitor", server_a.base_url, host_port(server_b), "--interval", "2", "--once"])
    assert not problems and not load.errors
    assert rates[server_a.name].generation_tokens_per_s > 0
    assert code == 0
    printed = capsys.readouterr().out
    assert "gen tok/s" in printed and server_a.name in printed and server_b.name in printed


def test_monitor_names_an_unreachable_server(capsys):
    port = free_port()
    assert moesvd_main(["monitor", f"127.0.0.1:{port}", "--interval", "0.2", "--once"]) == 1
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in capsys.readouterr().err
    assert moesvd_main(["monitor", "--prometheus", f"http://127.0.0.1:{port}", "--once", "--interval", "0.2"]) == 1
    assert f"cannot reach Prometheus at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert moesvd_main(["monitor"]) == 2


# ---------------------------------------------------------------- real Prometheus


def shipped_config_for(tmp_path: Path, dense: str, compressed: str) -> Path:
    """The shipped files with the arms' addresses and 1 s scrape/evaluation intervals."""
    for name in SHIPPED:
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert DENSE_PLACEHOLDER in config and COMPRESSED_PLACEHOLDER in config
    config = config.replace(DENSE_PLACEHOLDER, dense).replace(COMPRESSED_PLACEHOLDER, compressed)
    config, count = re.subn(r"(scrape_interval|evaluation_interval): 15s", r"\1: 1s", config)
    assert count == 2
    (tmp_path / "prometheus.yml").write_text(config)
    return tmp_path / "prometheus.yml"


def wait_for(query, prometheus_url: str, names: set[str], timeout_s: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        values = values_by_model(prometheus_query(prometheus_url, query))
        if names <= {k for k, v in values.items() if v > 0}:
            return values
        time.sleep(1.0)
    raise AssertionError(f"{query} never became > 0 for {names} in {timeout_s:.0f} s; last: {values}")


def dashboard_queries(model_a: str, model_b: str) -> list[tuple[str, str]]:
    import json

    dashboard = json.loads((PROMETHEUS_DIR / "grafana_dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$model_a", model_a).replace("$model_b", model_b)
            queries.append((panel["title"], expr))
    return queries


def test_prometheus_records_tokens_per_second_per_model_name(ab_arms, prometheus_server, tmp_path, capsys):
    server_a, server_b = ab_arms
    config = shipped_config_for(tmp_path, host_port(server_a), host_port(server_b))
    prometheus = prometheus_server(config)
    names = {server_a.name, server_b.name}
    with BoundedLoad([server_a, server_b]) as load:
        generation = wait_for("model_name:vllm_generation_tokens:rate1m", prometheus.url, names)
        prompt = wait_for("model_name:vllm_prompt_tokens:rate1m", prometheus.url, names)
        from_api = rates_from_prometheus(prometheus.url)
        code = moesvd_main(["monitor", "--prometheus", prometheus.url, "--once", "--interval", "0.1"])
        panels = {title: prometheus_query(prometheus.url, expr)
                  for title, expr in dashboard_queries(server_a.name, server_b.name)}
    assert not load.errors, load.errors[:3]
    assert generation.keys() >= names and prompt.keys() >= names
    for name in names:
        assert from_api[name].generation_tokens_per_s > 0 and from_api[name].prompt_tokens_per_s > 0
    assert code == 0
    printed = capsys.readouterr().out
    assert server_a.name in printed and server_b.name in printed and "Prometheus" in printed
    # every dashboard query is valid PromQL on this Prometheus; the tokens/s panels have data
    assert panels["generation tokens/s"] and panels["prompt tokens/s"]
    assert panels["generation tokens/s B/A"] and float(panels["generation tokens/s B/A"][0]["value"][1]) > 0
    assert panels["generation tokens/s, raw (no recording rules needed)"]


def test_histogram_quantile_matches_prometheus(ab_arms, prometheus_server, tmp_path):
    """Our p99 from /metrics buckets equals PromQL histogram_quantile on the same (settled) counters."""
    server_a, server_b = ab_arms
    prometheus = prometheus_server(shipped_config_for(tmp_path, host_port(server_a), host_port(server_b)))
    for _ in range(3):
        complete(server_a, max_tokens=4)
    expected_total = scrape(server_a.base_url).samples
    total = sum(v for (n, labels), v in expected_total.items()
                if n == GENERATION_TOKENS and dict(labels).get("model_name") == server_a.name)
    query_total = f'sum({GENERATION_TOKENS}{{model_name="{server_a.name}"}})'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until Prometheus has scraped the settled counters
        result = prometheus_query(prometheus.url, query_total)
        if result and float(result[0]["value"][1]) == total:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("Prometheus never saw the settled counters")
    buckets = buckets_by_model(scrape(server_a.base_url).samples, TTFT_BUCKET)[server_a.name]
    for q in (0.5, 0.9, 0.99):
        ours = histogram_quantile(q, buckets)
        theirs = prometheus_query(
            prometheus.url,
            f'histogram_quantile({q}, sum by (le) ({TTFT_BUCKET}{{model_name="{server_a.name}"}}))')
        assert ours == pytest.approx(float(theirs[0]["value"][1]), rel=1e-9), q
