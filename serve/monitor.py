"""`moesvd monitor`: live tokens/s, queue and TTFT p99 per `model_name`.

    moesvd monitor http://127.0.0.1:8000 http://127.0.0.1:8001 [--interval 5] [--once]
    moesvd monitor --prometheus http://127.0.0.1:9090 [--window 1m] [--once]

Without --prometheus, rates come from successive scrapes of each server's /metrics (the first table
appears after one interval). With --prometheus, each table is one round of PromQL instant queries
(see serve/vllm_metrics.PROMQL; the same expressions as serve/prometheus/recording_rules.yml).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime

from serve.vllm_metrics import MetricsError, MetricsWatcher, ModelRates, rates_from_prometheus

logger = logging.getLogger(__name__)

COLUMNS = (("model_name", "model_name", "{}"),
           ("generation_tokens_per_s", "gen tok/s", "{:.1f}"),
           ("prompt_tokens_per_s", "prompt tok/s", "{:.1f}"),
           ("requests_per_s", "req/s", "{:.2f}"),
           ("requests_running", "running", "{:.0f}"),
           ("requests_waiting", "waiting", "{:.0f}"),
           ("ttft_p99_s", "TTFT p99 (ms)", "ms"))


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "ms":
        return f"{value * 1000:.0f}"
    return spec.format(value)


def format_table(rates: dict[str, ModelRates]) -> str:
    header = [title for _, title, _ in COLUMNS]
    rows = [[_cell(getattr(r, key), spec) for key, _, spec in COLUMNS]
            for r in sorted(rates.values(), key=lambda r: r.model_name)]
    widths = [max(len(c) for c in column) for column in zip(header, *rows)] if rows else map(len, header)
    widths = list(widths)
    render = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [render(header)] + [render(r) for r in rows]
    if not rows:
        lines.append("(no vLLM model series yet)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="*", metavar="URL", help="vLLM server base URLs (their /metrics)")
    parser.add_argument("--prometheus", metavar="URL", help="read from this Prometheus server instead")
    parser.add_argument("--window", default="1m", help="PromQL rate window with --prometheus (default 1m)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between tables (default 5)")
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.add_argument("--count", type=int, default=0, help="stop after this many tables (0: never)")


def _one_round(args, watcher: MetricsWatcher | None) -> tuple[dict[str, ModelRates], list[str]]:
    if args.prometheus:
        try:
            return rates_from_prometheus(args.prometheus, args.window), []
        except MetricsError as err:
            return {}, [str(err)]
    return watcher.poll()


def run(args: argparse.Namespace) -> int:
    if not args.urls and not args.prometheus:
        print("moesvd monitor: give one or more vLLM server URLs, or --prometheus URL", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("moesvd monitor: --interval must be > 0 seconds", file=sys.stderr)
        return 2
    watcher = None if args.prometheus else MetricsWatcher(args.urls)
    if watcher is not None:
        _, problems = watcher.poll()  # primes the counters; rates need two scrapes
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        time.sleep(args.interval)
    limit = 1 if args.once else args.count
    shown, failures_in_a_row = 0, 0
    try:
        while True:
            rates, problems = _one_round(args, watcher)
            for problem in problems:
                print(f"warning: {problem}", file=sys.stderr)
            failures_in_a_row = failures_in_a_row + 1 if problems and not rates else 0
            print(f"\n{datetime.now().strftime('%H:%M:%S')}  "
                  f"{'(' + args.window + ' window, Prometheus)' if args.prometheus else f'({args.interval:g} s)'}")
            print(format_table(rates), flush=True)
            shown += 1
            if limit and shown >= limit:
                return 1 if failures_in_a_row else 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
