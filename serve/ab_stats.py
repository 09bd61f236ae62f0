"""Ratios B/A over alternating rounds: median, spread and a verdict that admits noise.

Each load level runs R rounds; a round sends the same requests to A and to B, one arm after the other,
the order alternating (A-B, B-A, A-B, ...), so a slow drift of the machine cancels instead of favouring an
arm. Every round gives one paired ratio B/A per metric. We report:
  median   the median of the R per-round ratios;
  low/high the smallest and largest per-round ratio (the spread). As an interval for the median ratio
           it is distribution-free: the true median lies between the min and the max of R independent
           rounds with probability 1 - 2^(1-R) (75 % for 3 rounds, 94 % for 5, 98 % for 7), whatever the
           noise looks like (it only asks that a round is as likely to land above as below);
  verdict  "faster" / "slower" when the whole [low, high] lies on one side of 1.0 (for throughput
           higher is faster, for latencies lower is), else "no difference within the noise".
The per-task scores of `moesvd ab --tasks` use a paired bootstrap instead (serve/ab_tasks.py): there
the units (documents) are many and exchangeable, here rounds are few and the machine's drift is the noise.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from serve.speed import THROUGHPUT_KEYS

FASTER, SLOWER, NO_DIFFERENCE = "faster", "slower", "no difference within the noise"


def higher_is_better(key: str) -> bool | None:
    """True for throughputs, False for latencies (*_ms), None where "faster" has no meaning (std, counts)."""
    if key in THROUGHPUT_KEYS:
        return True
    if key.endswith("_ms") and not key.startswith("std_"):
        return False
    return None


def interval_coverage(rounds: int) -> float:
    """Probability that [min, max] of `rounds` independent paired ratios holds their median."""
    return 1.0 - 2.0 ** (1 - rounds) if rounds >= 2 else 0.0


def verdict(low: float, high: float, higher_better: bool) -> str:
    """"faster" when [low, high] excludes 1.0 on the good side, "slower" on the bad side, else noise."""
    if low > 1.0:
        return FASTER if higher_better else SLOWER
    if high < 1.0:
        return SLOWER if higher_better else FASTER
    return NO_DIFFERENCE


@dataclass(frozen=True)
class RatioStats:
    """B/A of one metric over the rounds of one level."""

    median: float
    low: float
    high: float
    per_round: list[float]
    verdict: str | None  # None for metrics without a better direction

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        text = f"{self.median:.3g} [{self.low:.3g}-{self.high:.3g}]"
        return f"{text} {self.verdict}" if self.verdict else text


def ratio_stats(key: str, a_rounds: list[dict], b_rounds: list[dict]) -> RatioStats | None:
    """Paired per-round ratios B/A of `key`; None when a round of either arm has nothing to compare."""
    ratios = []
    for a, b in zip(a_rounds, b_rounds):
        if not a.get("completed") or not b.get("completed"):
            return None
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None or not va:
            return None
        ratios.append(float(vb) / float(va))
    if not ratios:
        return None
    direction = higher_is_better(key)
    low, high = min(ratios), max(ratios)
    return RatioStats(median=statistics.median(ratios), low=low, high=high, per_round=ratios,
                      verdict=None if direction is None else verdict(low, high, direction))


def level_ratio_stats(keys: list[str], a_rounds: list[dict], b_rounds: list[dict]) -> dict[str, dict | None]:
    """{key: RatioStats as a dict (or None)} for every key, from the per-round metrics of both arms."""
    out = {}
    for key in keys:
        stats = ratio_stats(key, a_rounds, b_rounds)
        out[key] = None if stats is None else stats.to_dict()
    return out


def describe(stats: dict | None) -> str:
    """'1.43 [1.38-1.47] faster' for a RatioStats dict, 'n/a' for None."""
    if not stats:
        return "n/a"
    return RatioStats(**stats).describe()
