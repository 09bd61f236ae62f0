"""`moesvd ab`: A/B compare two OpenAI-compatible servers on the same prompts (speed, quality, tasks).

Python API (used by `moesvd demo`):
    report = run_ab(ABOptions(a_url="http://127.0.0.1:8000", b_url="http://127.0.0.1:8001"))
    print(report.to_console()); report.to_markdown(); report.write(out_dir)

Order of work: resolve both arms (model names from /v1/models when not given; with --tasks also
lm-eval, the tasks, a tokenizer and a log-probability probe per arm: every check before any load) ->
speed: per load level a warm-up of each arm, then alternating rounds (A-B, B-A, A-B, ...; serve/ab_speed.py)
-> quality requests (echo + logprobs + greedy continuation; serve/quality.py) -> lm-eval tasks on A, then
on B (serve/ab_tasks.py) -> report. The arms are never loaded at the same time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moesvd_vllm.options import add_arguments as add_option_arguments
from moesvd_vllm.options import from_arguments, from_mapping, option
from serve.ab_report import ABReport
from serve.ab_speed import ARMS, ArmAccounting, SpeedPhase, SpeedPlan
from serve.ab_stats import interval_coverage
from serve.endpoints import Endpoint, EndpointError, resolve_endpoint
from serve.loadgen import GenerationSettings
from serve.prompts import (DEFAULT_NUM_PROMPTS, DEFAULT_SEED, DEFAULT_WORDS_PER_PROMPT, PromptError,
                           load_prompts, prompts_sha256)
from serve.quality import PromptScores, QualitySettings, compare_quality, score_prompts

logger = logging.getLogger(__name__)

MIN_ROUNDS = 3
# Measured on the shared 2-core machine with two servers of one model (docs/monitoring.md, "How long a
# round must be"): the per-round log-ratio spread was 0.52-0.64 for rounds of 1-5 s and 0.21 for rounds
# of 8-10 s; 6 rounds (orders balanced, min-max holding the median with 97 %) covered 1.0 in 15 of 15 runs,
# 3 rounds in 13 of 15.
DEFAULT_ROUNDS = 6
DEFAULT_MIN_ROUND_SECONDS = 8.0


class ABError(RuntimeError):
    """The A/B cannot start (bad options, unreachable arm); the message names the problem and the fix."""


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


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class ABOptions:
    a_url: str = option(help="arm A (reference, e.g. dense) base URL", flag="--a", metavar="URL")
    b_url: str = option(help="arm B (e.g. compressed) base URL", flag="--b", metavar="URL")
    a_model: str | None = option(None, "model name on A (unset: the only one /v1/models lists)")
    b_model: str | None = option(None, "model name on B (unset: the only one /v1/models lists)")
    prompts_path: Path | None = option(
        None, "prompts: .jsonl ({\"prompt\": ...} a line) or plain text cut into windows (unset: the "
        "bundled corpus test split)", flag="--prompts", metavar="FILE")
    num_prompts: int = option(DEFAULT_NUM_PROMPTS, "prompts to use (a JSONL file: its first N lines)")
    words_per_prompt: int = option(DEFAULT_WORDS_PER_PROMPT, "window length when prompts come from text")
    seed: int = option(DEFAULT_SEED, "seed of the prompt choice and of Poisson arrivals")
    concurrency: tuple[int, ...] = option((1, 8, 32), "max concurrent requests per level",
                                          parse=_int_list, exclusive="load")
    request_rates: tuple[float, ...] = option(
        (), "Poisson request rates per level, requests/s (instead of --concurrency)", flag="--request-rate",
        parse=_float_list, exclusive="load")
    speed: bool = option(True, "measure speed (--no-speed: quality and tasks only)")
    repeats: int = option(DEFAULT_ROUNDS, f"measured rounds per load level (at least {MIN_ROUNDS}), arm order "
                          "alternating (A-B, B-A, A-B, ...); each ratio is the median of the per-round "
                          "ratios with their min-max spread")
    min_round_seconds: float = option(
        DEFAULT_MIN_ROUND_SECONDS, "repeat the prompts within a round until it lasts at least this long "
        "(estimated from the warm-up; 0: each prompt once)")
    max_repetitions: int = option(64, "cap on the prompt repetitions per round")
    max_tokens: int = option(64, "output tokens per speed request")
    ignore_eos: bool = option(True, "send vLLM's ignore_eos (--no-ignore-eos for servers that reject it)")
    quality: bool = option(True, "measure quality (perplexity, KL, top-1, exact match); --no-quality: off")
    top_logprobs: int = option(20, "k of the top-k log-probabilities compared (vLLM's --max-logprobs caps it)")
    quality_max_tokens: int = option(16, "greedy continuation length compared for exact match")
    tasks: tuple[str, ...] = option(
        (), "lm-evaluation-harness tasks run on both arms (names or YAML files, comma-separated; local: "
        "kjv_sentence_ending, kjv_cloze); needs `pip install 'moesvd-vllm[eval]'`", parse=_name_list,
        metavar="TASKS")
    num_fewshot: int | None = option(None, "few-shot examples per task (unset: the task's default)")
    limit: int | None = option(None, "documents per task (unset: all)")
    task_batch_size: int = option(16, "prompts per lm-eval request", flag="--batch-size")
    task_seed: int = option(1234, "lm-eval seeds (sampling, few-shot choice) and of the bootstrap")
    task_concurrency: int = option(1, "concurrent lm-eval requests per arm")
    bootstrap_resamples: int = option(1000, "paired bootstrap resamples of each task metric's difference")
    a_tokenizer: str | None = option(
        None, "tokenizer directory of arm A for lm-eval (unset: the model directory /v1/models names, "
        "else the server's /tokenize)")
    b_tokenizer: str | None = option(None, "tokenizer directory of arm B for lm-eval (as --a-tokenizer)")
    request_timeout_s: float = option(600.0, "timeout of one request (s)", flag="--request-timeout")
    out: Path | None = option(None, "directory for ab-report-*.json, .md and PNG plots (unset: none)",
                              metavar="DIR")
    plots: bool = option(True, "write PNG plots with the report")
    show_progress: bool = option(True, "progress bars", flag="--progress")

    @classmethod
    def from_dict(cls, values: dict) -> "ABOptions":
        return from_mapping(cls, values, error=ABError, what="A/B option")

    def __post_init__(self) -> None:
        if self.request_rates and any(r <= 0 for r in self.request_rates):
            raise ABError(f"request rates must be > 0 requests/s, got {list(self.request_rates)}")
        if not self.request_rates and (not self.concurrency or any(c < 1 for c in self.concurrency)):
            raise ABError(f"concurrency levels must be integers >= 1, got {list(self.concurrency)}")
        if self.repeats < MIN_ROUNDS:
            raise ABError(f"repeats must be >= {MIN_ROUNDS} (alternating rounds A-B, B-A, A-B give the "
                          f"spread of every ratio), got {self.repeats}")
        if self.min_round_seconds < 0 or self.max_repetitions < 1:
            raise ABError("min_round_seconds must be >= 0 and max_repetitions >= 1")
        if self.max_tokens < 1 or self.quality_max_tokens < 0 or self.top_logprobs < 1:
            raise ABError("max_tokens must be >= 1, quality_max_tokens >= 0 and top_logprobs >= 1")
        if (self.num_fewshot is not None and self.num_fewshot < 0) or (self.limit is not None and self.limit < 1):
            raise ABError("num_fewshot must be >= 0 and limit >= 1")
        if self.task_batch_size < 1 or self.task_concurrency < 1 or self.bootstrap_resamples < 1:
            raise ABError("task_batch_size, task_concurrency and bootstrap_resamples must be >= 1")

    def levels(self) -> list[tuple[int | None, float]]:
        """(max_concurrency, request_rate) per load level."""
        if self.request_rates:
            return [(None, rate) for rate in self.request_rates]
        return [(c, float("inf")) for c in self.concurrency]

    def speed_plan(self) -> SpeedPlan:
        return SpeedPlan(levels=self.levels(), repeats=self.repeats, min_round_seconds=self.min_round_seconds,
                         max_repetitions=self.max_repetitions, seed=self.seed, show_progress=self.show_progress,
                         settings=GenerationSettings(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                                                     request_timeout_s=self.request_timeout_s))

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def _resolve_arms(options: ABOptions) -> dict[str, Endpoint]:
    arms = {}
    for label, url, model in (("A", options.a_url, options.a_model), ("B", options.b_url, options.b_model)):
        try:
            arms[label] = resolve_endpoint(label, url, model)
        except EndpointError as err:
            raise ABError(f"arm {label}: {err}") from None
    return arms


def _prepare_tasks(options: ABOptions, arms: dict[str, Endpoint]):
    """Every check the task evaluation needs (lm-eval, task names, tokenizers, logprobs), or None."""
    if not options.tasks:
        return None
    from serve.ab_tasks import TaskError, TaskSettings, prepare_task_run

    settings = TaskSettings(tasks=options.tasks, num_fewshot=options.num_fewshot, limit=options.limit,
                            batch_size=options.task_batch_size, seed=options.task_seed,
                            num_concurrent=options.task_concurrency, bootstrap_resamples=options.bootstrap_resamples,
                            request_timeout_s=options.request_timeout_s)
    try:
        return prepare_task_run(settings, arms, {"A": options.a_tokenizer, "B": options.b_tokenizer})
    except TaskError as err:
        raise ABError(str(err)) from None


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

    Raises ABError when it cannot start (bad prompts, an arm unreachable or not OpenAI-compatible, with
    tasks: lm-eval missing, an unknown task, no tokenizer, no prompt log-probabilities).
    Failures after the start are recorded in the report (`complete` false, `problems` listed).
    """
    try:
        prompts, prompt_source = load_prompts(options.prompts_path, num_prompts=options.num_prompts,
                                              words_per_prompt=options.words_per_prompt, seed=options.seed)
    except (PromptError, FileNotFoundError) as err:
        raise ABError(str(err)) from None
    arms = _resolve_arms(options)
    task_run = _prepare_tasks(options, arms)
    started_wall, started = dt.datetime.now(dt.timezone.utc), time.monotonic()
    problems: list[str] = []
    accounting = {label: ArmAccounting() for label in ARMS}
    down: dict[str, str] = {}  # arm -> why it was skipped from then on
    speed, series = ([], {}) if not options.speed else SpeedPhase(arms, prompts, options.speed_plan(), accounting,
                                                                  problems, down).run()
    quality = _quality_phase(arms, prompts, options, accounting, problems, down) if options.quality else None
    tasks = task_run.run(down, problems, show_progress=options.show_progress) if task_run else None
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
        "speed_interval": {"rounds": options.repeats, "coverage": interval_coverage(options.repeats),
                           "meaning": "B/A = median of the per-round ratios; [min-max] over rounds holds "
                                      "the median ratio with this probability (distribution-free)"},
        "definitions": "speed: vllm bench serve (serve/speed.py), ratios: serve/ab_stats.py; quality: "
                       "serve/quality.py; tasks: lm-evaluation-harness (serve/ab_tasks.py)",
    }
    report = ABReport(metadata=metadata, speed=speed, speed_series=series, quality=quality, tasks=tasks,
                      accounting={k: dataclasses.asdict(v) for k, v in accounting.items()},
                      problems=problems)
    if options.out is not None:
        report.write(Path(options.out), plots=options.plots)
    return report


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, ABOptions)


def options_from_args(args: argparse.Namespace) -> ABOptions:
    return from_arguments(ABOptions, args)


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
