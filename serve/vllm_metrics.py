"""Tokens/s and latency per `model_name`, from vLLM's /metrics or from a Prometheus server.

vLLM exports counters, not rates (it removed its tokens/s gauge): tokens/s is the increase of
`vllm:generation_tokens_total` (or `vllm:prompt_tokens_total`) between two scrapes divided by the time
between them, which is what `rate(vllm:generation_tokens_total[1m])` computes in Prometheus.

Python API:
    read_tokens_per_second(url, interval_s=5.0) -> {model_name: ModelRates}   (two scrapes of /metrics)
    MetricsWatcher(url).poll() -> {model_name: ModelRates}                  (rates since the last poll)
    rates_from_prometheus(prometheus_url, window="1m") -> {model_name: ModelRates}   (PromQL)
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass

from serve.http import HTTPError, get_text, parse_metrics

logger = logging.getLogger(__name__)

GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"

# PromQL per ModelRates field; WINDOW is replaced by the range (e.g. 1m). These are the expressions of
# the recording rules in serve/prometheus/recording_rules.yml, written out so that a Prometheus without
# those rules answers too.
PROMQL = {
    "generation_tokens_per_s": f"sum by (model_name) (rate({GENERATION_TOKENS}[WINDOW]))",
    "prompt_tokens_per_s": f"sum by (model_name) (rate({PROMPT_TOKENS}[WINDOW]))",
    "requests_per_s": f"sum by (model_name) (rate({REQUEST_SUCCESS}[WINDOW]))",
    "requests_running": f"sum by (model_name) ({RUNNING})",
    "requests_waiting": f"sum by (model_name) ({WAITING})",
    "ttft_p99_s": f"histogram_quantile(0.99, sum by (model_name, le) (rate({TTFT_BUCKET}[WINDOW])))",
}


class MetricsError(RuntimeError):
    """/metrics or Prometheus could not be read; the message names the URL and the fix."""


@dataclass
class ModelRates:
    """One model's load over an interval (rates per second; None where unknown)."""

    model_name: str
    generation_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    ttft_p99_s: float | None = None  # None when no request got its first token in the interval
    interval_s: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Scrape:
    url: str
    monotonic_s: float
    samples: dict


# A vLLM API server sharing a small CPU with busy engines can take seconds to render /metrics; a monitor
# would rather wait than report a live server as unreachable.
SCRAPE_TIMEOUT_S = 30.0


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Scrape:
    """GET a /metrics URL (a base URL gets /metrics appended) and parse it."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    metrics_url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        text = get_text(metrics_url, timeout=timeout)
    except HTTPError as err:
        raise MetricsError(f"{metrics_url} answered HTTP {err.status}; is this a vLLM server?") from None
    except (urllib.error.URLError, OSError) as err:
        raise MetricsError(f"cannot reach {metrics_url} ({getattr(err, 'reason', err)}); check the URL "
                           "and that the server runs") from None
    try:
        samples = parse_metrics(text)
    except ValueError as err:
        raise MetricsError(f"{metrics_url} is not Prometheus text format ({err})") from None
    return Scrape(url=metrics_url, monotonic_s=time.monotonic(), samples=samples)


def _by_model(samples: dict, name: str) -> dict[str, float]:
    """Sum of the samples called `name` per model_name label."""
    totals: dict[str, float] = defaultdict(float)
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            totals[dict(labels).get("model_name", "")] += value
    return dict(totals)


def buckets_by_model(samples: dict, name: str) -> dict[str, dict[float, float]]:
    """{model_name: {upper bound: cumulative count}} of a histogram's `_bucket` samples."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            label_map = dict(labels)
            buckets[label_map.get("model_name", "")][float(label_map["le"])] += value
    return {model: dict(b) for model, b in buckets.items()}


def counter_increase(before: float | None, after: float) -> float:
    """Increase of a counter; a drop means the server restarted, so the new value is the increase."""
    if before is None or after < before:
        return after
    return after - before


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative bucket counts {upper bound: count}.

    Linear interpolation inside the bucket that holds the q-th observation, 0 as the lower bound of
    the first bucket; a quantile in the +Inf bucket returns the largest finite bound. None without
    observations.
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return bounds[-2] if len(bounds) > 1 else None
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return bounds[-2] if len(bounds) > 1 else None


def rates_between(before: Scrape, after: Scrape) -> dict[str, ModelRates]:
    """Per-model rates over the time between two scrapes of the same /metrics."""
    seconds = after.monotonic_s - before.monotonic_s
    if seconds <= 0:
        raise ValueError("the second scrape must come after the first")
    rates: dict[str, ModelRates] = {}
    running, waiting = _by_model(after.samples, RUNNING), _by_model(after.samples, WAITING)
    before_buckets = buckets_by_model(before.samples, TTFT_BUCKET)
    for field_name, metric in (("generation_tokens_per_s", GENERATION_TOKENS),
                               ("prompt_tokens_per_s", PROMPT_TOKENS), ("requests_per_s", REQUEST_SUCCESS)):
        old = _by_model(before.samples, metric)
        for model, value in _by_model(after.samples, metric).items():
            entry = rates.setdefault(model, ModelRates(model_name=model, interval_s=seconds,
                                                       source=after.url))
            setattr(entry, field_name, counter_increase(old.get(model), value) / seconds)
    for model, entry in rates.items():
        entry.requests_running, entry.requests_waiting = running.get(model), waiting.get(model)
        new = buckets_by_model(after.samples, TTFT_BUCKET).get(model, {})
        old = before_buckets.get(model, {})
        increase = {le: counter_increase(old.get(le), count) for le, count in new.items()}
        entry.ttft_p99_s = histogram_quantile(0.99, increase)
    return rates


def read_tokens_per_second(url: str, interval_s: float = 5.0) -> dict[str, ModelRates]:
    """Scrape a vLLM server's /metrics twice, `interval_s` apart, and return per-model rates."""
    first = scrape(url)
    time.sleep(interval_s)
    return rates_between(first, scrape(url))


class MetricsWatcher:
    """Rates since the previous poll of one or more /metrics URLs (the first poll only primes)."""

    def __init__(self, urls: list[str], timeout_s: float = SCRAPE_TIMEOUT_S):
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.previous: dict[str, Scrape] = {}

    def poll(self) -> tuple[dict[str, ModelRates], list[str]]:
        """({model_name: rates}, [problems]); a URL that fails is reported and skipped this round."""
        rates: dict[str, ModelRates] = {}
        problems = []
        for url in self.urls:
            try:
                current = scrape(url, timeout=self.timeout_s)
            except MetricsError as err:
                problems.append(str(err))
                continue
            previous = self.previous.get(url)
            self.previous[url] = current
            if previous is not None:
                rates.update(rates_between(previous, current))
        return rates, problems


# ---------------------------------------------------------------- Prometheus HTTP API


def prometheus_query(prometheus_url: str, promql: str, timeout: float = 10.0) -> list[dict]:
    """Instant query; returns Prometheus' `data.result` (a list of {metric: labels, value: [t, "v"]})."""
    url = prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        answer = json.loads(get_text(url, timeout=timeout))
    except HTTPError as err:
        raise MetricsError(f"Prometheus at {prometheus_url} refused {promql!r}: HTTP {err.status} "
                           f"{err.body[:300]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise MetricsError(f"cannot reach Prometheus at {prometheus_url} ({getattr(err, 'reason', err)})") \
            from None
    except json.JSONDecodeError:
        raise MetricsError(f"{prometheus_url} did not answer JSON; is it a Prometheus server?") from None
    if answer.get("status") != "success":
        raise MetricsError(f"Prometheus query {promql!r} failed: {answer.get('error', answer)}")
    return answer["data"]["result"]


def values_by_model(result: list[dict]) -> dict[str, float]:
    """{model_name: value} of an instant-vector result (NaN values, e.g. no observations, dropped)."""
    values = {}
    for item in result:
        value = float(item["value"][1])
        if not math.isnan(value):
            values[item["metric"].get("model_name", "")] = value
    return values


def rates_from_prometheus(prometheus_url: str, window: str = "1m") -> dict[str, ModelRates]:
    """Per-model rates over the last `window`, computed by Prometheus (see PROMQL)."""
    rates: dict[str, ModelRates] = {}
    for field_name, template in PROMQL.items():
        for model, value in values_by_model(
                prometheus_query(prometheus_url, template.replace("WINDOW", window))).items():
            entry = rates.setdefault(model, ModelRates(model_name=model,
                                                       source=f"prometheus {prometheus_url} [{window}]"))
            setattr(entry, field_name, value)
    return rates
