"""Speed metrics of one load run, with the definitions and JSON key names of `vllm bench serve`.

From vllm/benchmarks/serve.py (`calculate_metrics` and the result dict of `benchmark`):
  request_throughput  = completed requests / wall duration of the run (s)
  output_throughput   = sum of output tokens of completed requests / duration
  total_token_throughput = (prompt + output tokens of completed requests) / duration
  TTFT                = one value per completed request
  TPOT                = (e2e latency - TTFT) / (output tokens - 1), only for requests with > 1 token
  ITL                 = every gap between successive token chunks, pooled over all requests
  E2EL                = end-to-end latency per completed request
  each with mean_*_ms, median_*_ms, std_*_ms and p{P}_*_ms (numpy percentiles, linear interpolation).
Failed requests count in `failed` and nowhere else. With no completed request every statistic is 0,
as in vLLM (which takes np.mean(... or 0)); `completed` tells such a run apart.
"""

from __future__ import annotations

import numpy as np

from serve.loadgen import LoadRun

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
# Higher is better for these keys; lower is better for every *_ms key (serve/ab_stats.py).
THROUGHPUT_KEYS = ("request_throughput", "output_throughput", "total_token_throughput")


def _percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _latency_stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict:
    values = values_s or [0.0]
    stats = {f"mean_{name}_ms": float(np.mean(values)) * 1000,
             f"median_{name}_ms": float(np.median(values)) * 1000,
             f"std_{name}_ms": float(np.std(values)) * 1000}
    for p in percentiles:
        stats[f"p{_percentile_word(p)}_{name}_ms"] = float(np.percentile(values, p)) * 1000
    return stats


def speed_metrics(run: LoadRun, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
    """The `vllm bench serve` result keys for one run (plus its load level and token sources)."""
    done = [r for r in run.results if r.success]
    output_lens = [r.output_tokens for r in done]
    total_input = sum(r.prompt_tokens for r in done)
    duration = run.duration_s if run.duration_s > 0 else float("nan")
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in done], "tpot": tpots,
              "itl": [gap for r in done for gap in r.itl], "e2el": [r.latency for r in done]}
    metrics = {
        "max_concurrency": run.max_concurrency,
        "request_rate": "inf" if run.request_rate == float("inf") else run.request_rate,
        "duration": run.duration_s,
        "completed": len(done),
        "failed": len(run.results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": sum(output_lens),
        "request_throughput": len(done) / duration,
        "output_throughput": sum(output_lens) / duration,
        "total_token_throughput": (total_input + sum(output_lens)) / duration,
        "output_tokens_counted_from_chunks": any(r.output_tokens_counted_from_chunks for r in done),
    }
    for name in LATENCY_METRICS:
        metrics.update(_latency_stats(name, series[name], percentiles))
    return metrics


def per_request_series(run: LoadRun) -> dict:
    """The per-request lists `vllm bench serve` saves (seconds), for plots and re-analysis."""
    return {"input_lens": [r.prompt_tokens for r in run.results],
            "output_lens": [r.output_tokens if r.success else 0 for r in run.results],
            "ttfts": [r.ttft for r in run.results],
            "itls": [r.itl for r in run.results],
            "latencies": [r.latency for r in run.results],
            "errors": [r.error for r in run.results]}
