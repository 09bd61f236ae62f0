"""`moesvd ab`: A/B compare two OpenAI-compatible servers on the same prompts (speed and quality).

Python API (used by `moesvd demo`):
    report = run_ab(ABOptions(a_url="http://127.0.0.1:8000", b_url="http://127.0.0.1:8001"))
    print(report.to_console()); report.to_markdown(); report.write(out_dir)

Order of work: resolve both arms (model names from /v1/models when not given) -> one warm-up request
per arm -> for each load level, the same prompts to A and to B (the order alternates between levels,
A-B, B-A, ..., so slow drift on a shared machine does not favour one arm) -> quality requests (echo +
logprobs + greedy continuation) -> report. The arms are never loaded at the same time.
Speed definitions: serve/speed.py (those of `vllm bench serve`); quality: serve/quality.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from serve.ab_report import ABReport
from serve.endpoints import (Endpoint, EndpointError, describe_unreachable, list_models,
                             resolve_endpoint)
from serve.http import HTTPError, post_json
from serve.loadgen import GenerationSettings, LoadRun, pool_runs, run_load
from serve.prompts import (DEFAULT_NUM_PROMPTS, DEFAULT_SEED, DEFAULT_WORDS_PER_PROMPT, PromptError,
                           load_prompts, prompts_sha256)
from serve.quality import PromptScores, QualitySettings, compare_quality, score_prompts
from serve.speed import per_request_series, speed_metrics, speed_ratios

logger = logging.getLogger(__name__)

ARMS = ("A", "B")


class ABError(RuntimeError):
    """The A/B cannot start (bad options, unreachable arm); the message names the problem and the fix."""


@dataclass(frozen=True)
class ABOptions:
    a_url: str
    b_url: str
    a_model: str | None = None  # None: the only model listed by /v1/models
    b_model: str | None = None
    prompts_path: Path | None = None  # JSONL or plain text; None: bundled corpus test split
    num_prompts: int = DEFAULT_NUM_PROMPTS
    words_per_prompt: int = DEFAULT_WORDS_PER_PROMPT
    seed: int = DEFAULT_SEED
    concurrency: tuple[int, ...] = (1, 8, 32)
    request_rates: tuple[float, ...] = ()  # when set: one level per rate (Poisson arrivals), no cap
    repeats: int = 1  # rounds per level (arm order alternating), pooled; more rounds average out drift
    max_tokens: int = 64
    ignore_eos: bool = True
    warmup_requests: int = 1
    quality: bool = True
    top_logprobs: int = 20
    quality_max_tokens: int = 16
    request_timeout_s: float = 600.0
    out: Path | None = None  # where the JSON, markdown and PNGs go; None: nothing written
    plots: bool = True
    show_progress: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "ABOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ABError(f"unknown A/B option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.request_rates and any(r <= 0 for r in self.request_rates):
            raise ABError(f"request rates must be > 0 requests/s, got {list(self.request_rates)}")
        if not self.request_rates and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise ABError(f"concurrency levels must be integers >= 1, got {list(self.concurrency)}")
        if self.repeats < 1:
            raise ABError(f"repeats must be >= 1, got {self.repeats}")
        if self.max_tokens < 1 or self.quality_max_tokens < 0 or self.top_logprobs < 1:
            raise ABError("max_tokens must be >= 1, quality_max_tokens >= 0 and top_logprobs >= 1")

    def levels(self) -> list[tuple[int | None, float]]:
        """(max_concurrency, request_rate) per load level."""
        if self.request_rates:
            return [(None, rate) for rate in self.request_rates]
        return [(c, float("inf")) for c in self.concurrency]

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class ArmAccounting:
    """What one arm was asked to do, to reconcile with the server's own counters."""

    requests_sent: int = 0
    requests_succeeded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_phase: dict = field(default_factory=dict)

    def add(self, phase: str, sent: int, succeeded: int, prompt_tokens: int, completion_tokens: int):
        self.requests_sent += sent
        self.requests_succeeded += succeeded
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        entry = self.by_phase.setdefault(phase, {"requests_sent": 0, "requests_succeeded": 0,
                                                 "prompt_tokens": 0, "completion_tokens": 0})
        entry["requests_sent"] += sent
        entry["requests_succeeded"] += succeeded
        entry["prompt_tokens"] += prompt_tokens
        entry["completion_tokens"] += completion_tokens


def _resolve_arms(options: ABOptions) -> dict[str, Endpoint]:
    arms = {}
    for label, url, model in (("A", options.a_url, options.a_model), ("B", options.b_url, options.b_model)):
        try:
            arms[label] = resolve_endpoint(label, url, model)
        except EndpointError as err:
            raise ABError(f"arm {label}: {err}") from None
    return arms


def _warm_up(endpoint: Endpoint, text: str, options: ABOptions, accounting: ArmAccounting,
             problems: list[str]) -> None:
    for _ in range(options.warmup_requests):
        payload = {"model": endpoint.model, "prompt": text, "max_tokens": 4, "temperature": 0.0}
        try:
            answer = post_json(endpoint.url("/v1/completions"), payload, timeout=options.request_timeout_s)
        except HTTPError as err:
            problems.append(f"arm {endpoint.label} warm-up: HTTP {err.status}: {err.body[:200]}")
            accounting.add("warmup", 1, 0, 0, 0)
            continue
        except (urllib.error.URLError, OSError) as err:
            problems.append(f"arm {endpoint.label} warm-up: "
                            f"{describe_unreachable(endpoint.url('/v1/completions'), err)}")
            accounting.add("warmup", 1, 0, 0, 0)
            continue
        usage = answer.get("usage") or {}
        accounting.add("warmup", 1, 1, int(usage.get("prompt_tokens") or 0),
                       int(usage.get("completion_tokens") or 0))


def _level_name(max_concurrency: int | None, request_rate: float) -> str:
    return f"concurrency={max_concurrency}" if max_concurrency else f"request_rate={request_rate:g}"


def _account_load(run: LoadRun, accounting: ArmAccounting) -> None:
    done = [r for r in run.results if r.success]
    accounting.add("speed", len(run.results), len(done), sum(r.prompt_tokens for r in done),
                   sum(r.output_tokens for r in done))


def _arm_is_down(endpoint: Endpoint, run: LoadRun) -> bool:
    """Every request of the run failed and the server no longer lists its models."""
    if any(r.success for r in run.results):
        return False
    try:
        list_models(endpoint.base_url, timeout=5.0)
    except EndpointError:
        return True
    return False


def _skipped_metrics(reason: str, count: int) -> dict:
    return {"skipped": reason, "completed": 0, "failed": count}


def _run_arm_level(label: str, arms: dict[str, Endpoint], prompts, settings: GenerationSettings,
                   options: ABOptions, max_concurrency: int | None, rate: float, name: str,
                   accounting: dict[str, ArmAccounting], problems: list[str],
                   down: dict[str, str]) -> LoadRun:
    run = run_load(arms[label], prompts, settings, max_concurrency=max_concurrency, request_rate=rate,
                   seed=options.seed, show_progress=options.show_progress)
    _account_load(run, accounting[label])
    failed = [r for r in run.results if not r.success]
    if failed:
        problems.append(f"arm {label} {name}: {len(failed)} of {len(run.results)} requests failed "
                        f"(first: {failed[0].error[:300]})")
    if _arm_is_down(arms[label], run):
        down[label] = (f"arm {label} stopped answering during {name} (server down?); its later "
                       "levels and quality were skipped, earlier results are kept")
        problems.append(down[label])
    return run


def _speed_phase(arms: dict[str, Endpoint], prompts, options: ABOptions,
                 accounting: dict[str, ArmAccounting], problems: list[str],
                 down: dict[str, str]) -> tuple[list, dict]:
    """Per level: `repeats` rounds, each sending every prompt to both arms; the arm order alternates
    round after round and level after level (A-B, B-A, ...). Rounds of one arm are pooled: throughput
    is all completed work over the summed wall time, percentiles are over all requests."""
    settings = GenerationSettings(max_tokens=options.max_tokens, ignore_eos=options.ignore_eos,
                                  request_timeout_s=options.request_timeout_s)
    levels, series = [], {}
    rounds_done = 0
    for max_concurrency, rate in options.levels():
        name = _level_name(max_concurrency, rate)
        entry = {"level": name, "max_concurrency": max_concurrency,
                 "request_rate": "inf" if rate == float("inf") else rate, "order": [],
                 "repeats": options.repeats}
        runs: dict[str, list[LoadRun]] = {label: [] for label in ARMS}
        for _ in range(options.repeats):
            order = ARMS if rounds_done % 2 == 0 else ARMS[::-1]
            rounds_done += 1
            for label in order:
                if label in down:
                    continue
                entry["order"].append(label)
                runs[label].append(_run_arm_level(label, arms, prompts, settings, options, max_concurrency,
                                                  rate, name, accounting, problems, down))
        series[name] = {}
        for label in ARMS:
            if not runs[label]:
                entry[label] = _skipped_metrics(down.get(label, "not run"), len(prompts) * options.repeats)
                continue
            pooled = pool_runs(runs[label])
            entry[label] = speed_metrics(pooled)
            series[name][label] = per_request_series(pooled)
        entry["b_over_a"] = speed_ratios(entry["A"], entry["B"])
        levels.append(entry)
        logger.info("%s: output tok/s A %s, B %s", name, entry["A"].get("output_throughput"),
                    entry["B"].get("output_throughput"))
    return levels, series


def _quality_phase(arms: dict[str, Endpoint], prompts, options: ABOptions,
                   accounting: dict[str, ArmAccounting], problems: list[str], down: dict[str, str]) -> dict:
    settings = QualitySettings(top_logprobs=options.top_logprobs, max_tokens=options.quality_max_tokens,
                               request_timeout_s=options.request_timeout_s)
    scores = {}
    for label in ARMS:
        if label in down:
            scores[label] = [PromptScores(prompt_index=i, error=f"skipped: {down[label]}")
                             for i in range(len(prompts))]
            continue
        scores[label] = score_prompts(arms[label], prompts, settings, show_progress=options.show_progress)
        ok = [s for s in scores[label] if s.ok]
        accounting[label].add("quality", len(prompts), len(ok), sum(s.prompt_tokens for s in ok),
                              sum(s.completion_tokens for s in ok))
    section = compare_quality(prompts, scores["A"], scores["B"])
    if section["prompts_failed"]:
        problems.append(f"quality: {len(section['prompts_failed'])} of {len(prompts)} prompts failed on "
                        f"an arm (first: {section['prompts_failed'][0]})")
    if section["refused"]:
        problems.append(f"quality: {section['refused']}")
    return section


def run_ab(options: ABOptions) -> ABReport:
    """Run the whole A/B and return its report (written under options.out when set).

    Raises ABError when it cannot start (bad prompts, an arm unreachable or not OpenAI-compatible).
    Failures after the start are recorded in the report (`complete` false, `problems` listed).
    """
    try:
        prompts, prompt_source = load_prompts(options.prompts_path, num_prompts=options.num_prompts,
                                              words_per_prompt=options.words_per_prompt, seed=options.seed)
    except (PromptError, FileNotFoundError) as err:
        raise ABError(str(err)) from None
    arms = _resolve_arms(options)
    started_wall, started = dt.datetime.now(dt.timezone.utc), time.monotonic()
    problems: list[str] = []
    accounting = {label: ArmAccounting() for label in ARMS}
    for label in ARMS:
        _warm_up(arms[label], prompts[0].text, options, accounting[label], problems)
    down: dict[str, str] = {}  # arm -> why it was skipped from then on
    speed, series = _speed_phase(arms, prompts, options, accounting, problems, down)
    quality = _quality_phase(arms, prompts, options, accounting, problems, down) if options.quality else None
    metadata = {
        "tool": "moesvd ab",
        "started_at": started_wall.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.monotonic() - started,
        "arms": {label: {"url": e.base_url, "model": e.model, "server_version": e.version}
                 for label, e in arms.items()},
        "prompts": {"source": prompt_source, "count": len(prompts), "sha256": prompts_sha256(prompts),
                    "ids": [p.id for p in prompts]},
        "options": options.as_json(),
        "definitions": "speed: vllm bench serve (serve/speed.py); quality: serve/quality.py",
    }
    report = ABReport(metadata=metadata, speed=speed, speed_series=series, quality=quality,
                      accounting={k: dataclasses.asdict(v) for k, v in accounting.items()},
                      problems=problems)
    if options.out is not None:
        report.write(Path(options.out), plots=options.plots)
    return report


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 2,4.5, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", required=True, metavar="URL", help="arm A (reference, e.g. dense) base URL")
    parser.add_argument("--b", required=True, metavar="URL", help="arm B (e.g. compressed) base URL")
    parser.add_argument("--a-model", help="model name on A (default: the only one /v1/models lists)")
    parser.add_argument("--b-model", help="model name on B (default: the only one /v1/models lists)")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts: .jsonl ({\"prompt\": ...} a line) or plain text cut into windows "
                             "(default: the bundled corpus test split)")
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS,
                        help="prompts to use (default: %(default)s; a JSONL file: its first N lines)")
    parser.add_argument("--words-per-prompt", type=int, default=DEFAULT_WORDS_PER_PROMPT,
                        help="window length when prompts come from text (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the prompt choice and of Poisson arrivals (default: %(default)s)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, default=(1, 8, 32),
                      help="max concurrent requests per level (default: 1,8,32)")
    load.add_argument("--request-rate", type=_float_list, default=(),
                      help="Poisson request rates per level, requests/s (instead of --concurrency)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds per load level, arm order alternating (A-B, B-A, ...), pooled "
                             "(default: %(default)s; use 2+ on a busy machine)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="output tokens per speed request (default: %(default)s)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="do not send vLLM's ignore_eos (for servers that reject it)")
    parser.add_argument("--no-quality", action="store_true", help="speed only")
    parser.add_argument("--top-logprobs", type=int, default=20,
                        help="k of the top-k log-probabilities compared (default: %(default)s; vLLM's "
                             "--max-logprobs caps it)")
    parser.add_argument("--quality-max-tokens", type=int, default=16,
                        help="greedy continuation length compared for exact match (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="directory for ab-report-*.json, .md and PNG plots")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def options_from_args(args: argparse.Namespace) -> ABOptions:
    return ABOptions(a_url=args.a, b_url=args.b, a_model=args.a_model, b_model=args.b_model,
                     prompts_path=args.prompts, num_prompts=args.num_prompts,
                     words_per_prompt=args.words_per_prompt, seed=args.seed,
                     concurrency=args.concurrency, request_rates=args.request_rate, repeats=args.repeats,
                     max_tokens=args.max_tokens, ignore_eos=not args.no_ignore_eos,
                     quality=not args.no_quality, top_logprobs=args.top_logprobs,
                     quality_max_tokens=args.quality_max_tokens, out=args.out,
                     plots=not args.no_plots, show_progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    try:
        report = run_ab(options_from_args(args))
    except ABError as err:
        print(f"moesvd ab: {err}", file=sys.stderr)
        return 2
    print(report.to_console())
    if report.written_to:
        print(f"\nreport files: {', '.join(str(p) for p in report.written_to)}")
    return 0 if report.complete else 1
