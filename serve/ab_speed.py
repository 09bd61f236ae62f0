"""The speed phase of `moesvd ab`: per load level, a warm-up of each arm, then alternating measured rounds.

Per level (a max concurrency, or a Poisson request rate):
  1. warm-up: each arm serves one wave of the prompts at that level (min(prompts, concurrency) requests;
     at a request rate, all prompts), unmeasured: the first batch of a new shape pays allocations and
     kernel set-up, which must not land in one arm's numbers only;
  2. run length: the prompt list is repeated k times per round so that a round of the faster arm lasts
     at least `min_round_seconds` (k from the warm-up's time, the same k for both arms; capped at
     `max_repetitions`): short rounds are dominated by noise (docs/monitoring.md, "How long a round");
  3. `repeats` rounds (at least 3), each sending the same k x prompts to A and to B, one arm at a time,
     the order alternating round after round and level after level (A-B, B-A, A-B, ...).
Reported per level: each arm's metrics pooled over its rounds (throughput = all completed work / summed
wall time; percentiles over all requests), the metrics of every round, and every B/A ratio as the median
of the per-round ratios with its min-max spread and a verdict (serve/ab_stats.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from serve.ab_stats import level_ratio_stats
from serve.endpoints import Endpoint, EndpointError, list_models
from serve.loadgen import GenerationSettings, LoadRun, pool_runs, run_load
from serve.speed import THROUGHPUT_KEYS, per_request_series, speed_metrics

logger = logging.getLogger(__name__)

ARMS = ("A", "B")


@dataclass(frozen=True)
class SpeedPlan:
    """What the speed phase needs from the A/B options."""

    levels: list[tuple[int | None, float]]  # (max_concurrency, request_rate) per level
    settings: GenerationSettings
    repeats: int
    min_round_seconds: float
    max_repetitions: int
    seed: int
    show_progress: bool


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

    def add_run(self, phase: str, run: LoadRun) -> None:
        done = [r for r in run.results if r.success]
        self.add(phase, len(run.results), len(done), sum(r.prompt_tokens for r in done),
                 sum(r.output_tokens for r in done))


class SpeedPhase:
    """Runs the levels of one A/B; `problems` and `down` are shared with the rest of the A/B."""

    def __init__(self, arms: dict[str, Endpoint], prompts, plan: SpeedPlan,
                 accounting: dict[str, ArmAccounting], problems: list[str], down: dict[str, str]):
        self.arms, self.prompts, self.plan = arms, prompts, plan
        self.accounting, self.problems, self.down = accounting, problems, down
        self.rounds_done = 0

    def _next_order(self) -> tuple[str, ...]:
        order = ARMS if self.rounds_done % 2 == 0 else ARMS[::-1]
        self.rounds_done += 1
        return order

    def _run(self, label: str, prompts, max_concurrency: int | None, rate: float, name: str,
             phase: str) -> LoadRun:
        run = run_load(self.arms[label], prompts, self.plan.settings, max_concurrency=max_concurrency,
                       request_rate=rate, seed=self.plan.seed, show_progress=self.plan.show_progress)
        self.accounting[label].add_run(phase, run)
        failed = [r for r in run.results if not r.success]
        if failed:
            self.problems.append(f"arm {label} {name} {phase}: {len(failed)} of {len(run.results)} requests "
                                 f"failed (first: {failed[0].error[:300]})")
        if not any(r.success for r in run.results) and _lists_no_models(self.arms[label]):
            self.down[label] = (f"arm {label} stopped answering during {name} (server down?); its later "
                                "levels and quality were skipped, earlier results are kept")
            self.problems.append(self.down[label])
        return run

    def _warm_up(self, max_concurrency: int | None, rate: float, name: str, order) -> dict[str, float]:
        """One unmeasured wave per arm; the estimated duration of one full pass of the prompts."""
        wave = len(self.prompts) if max_concurrency is None else min(len(self.prompts), max_concurrency)
        passes_per_wave = math.ceil(len(self.prompts) / wave)
        estimates = {}
        for label in order:
            if label in self.down:
                continue
            run = self._run(label, self.prompts[:wave], max_concurrency, rate, name, "warmup")
            if any(r.success for r in run.results):
                estimates[label] = run.duration_s * passes_per_wave
        return estimates

    def _repetitions(self, estimates: dict[str, float]) -> int:
        if not estimates or self.plan.min_round_seconds <= 0:
            return 1
        fastest = max(min(estimates.values()), 1e-3)
        return max(1, min(self.plan.max_repetitions, math.ceil(self.plan.min_round_seconds / fastest)))

    def level(self, max_concurrency: int | None, rate: float) -> tuple[dict, dict]:
        """(the level's report entry, its per-request series per arm)."""
        name = level_name(max_concurrency, rate)
        first_order = ARMS if self.rounds_done % 2 == 0 else ARMS[::-1]
        estimates = self._warm_up(max_concurrency, rate, name, first_order)
        repetitions = self._repetitions(estimates)
        round_prompts = list(self.prompts) * repetitions
        entry = {"level": name, "max_concurrency": max_concurrency,
                 "request_rate": "inf" if rate == float("inf") else rate, "order": [],
                 "repeats": self.plan.repeats, "repetitions": repetitions,
                 "requests_per_round": len(round_prompts), "warmup_pass_estimate_s": estimates, "rounds": []}
        runs: dict[str, list[LoadRun]] = {label: [] for label in ARMS}
        for _ in range(self.plan.repeats):
            order = self._next_order()
            this_round = {"order": [label for label in order if label not in self.down]}
            for label in order:
                if label in self.down:
                    continue
                entry["order"].append(label)
                run = self._run(label, round_prompts, max_concurrency, rate, name, "speed")
                runs[label].append(run)
                this_round[label] = speed_metrics(run)
            entry["rounds"].append(this_round)
        return self._summarise(entry, runs, len(round_prompts)), self._series(runs)

    def _summarise(self, entry: dict, runs: dict[str, list[LoadRun]], per_round: int) -> dict:
        for label in ARMS:
            if runs[label]:
                entry[label] = speed_metrics(pool_runs(runs[label]))
            else:
                entry[label] = {"skipped": self.down.get(label, "not run"), "completed": 0,
                                "failed": per_round * self.plan.repeats}
        complete_rounds = [r for r in entry["rounds"] if "A" in r and "B" in r]
        keys = [k for k in entry["A"] if k in THROUGHPUT_KEYS or k.endswith("_ms")]
        if "skipped" in entry["A"]:
            keys = [k for k in entry["B"] if k in THROUGHPUT_KEYS or k.endswith("_ms")]
        entry["ratios"] = level_ratio_stats(keys, [r["A"] for r in complete_rounds],
                                            [r["B"] for r in complete_rounds])
        entry["b_over_a"] = {k: (v["median"] if v else None) for k, v in entry["ratios"].items()}
        logger.info("%s: output tok/s A %s, B %s, B/A %s", entry["level"], entry["A"].get("output_throughput"),
                    entry["B"].get("output_throughput"), entry["ratios"].get("output_throughput"))
        return entry

    @staticmethod
    def _series(runs: dict[str, list[LoadRun]]) -> dict:
        return {label: per_request_series(pool_runs(runs[label])) for label in ARMS if runs[label]}

    def run(self) -> tuple[list[dict], dict]:
        levels, series = [], {}
        for max_concurrency, rate in self.plan.levels:
            entry, level_series = self.level(max_concurrency, rate)
            levels.append(entry)
            series[entry["level"]] = level_series
        return levels, series


def level_name(max_concurrency: int | None, request_rate: float) -> str:
    return f"concurrency={max_concurrency}" if max_concurrency else f"request_rate={request_rate:g}"


def _lists_no_models(endpoint: Endpoint) -> bool:
    """The server no longer lists its models (it is down, not just refusing requests)."""
    try:
        list_models(endpoint.base_url, timeout=5.0)
    except EndpointError:
        return True
    return False
