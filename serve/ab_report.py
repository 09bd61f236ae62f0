"""The A/B report: one JSON file per run, a markdown summary, a console table and PNG plots."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from serve.ab_stats import describe

logger = logging.getLogger(__name__)

SCHEMA = "moesvd-ab/2"  # 2: per-round speed metrics, ratios as median [min-max] with a verdict; tasks

# (JSON key, row label) of the speed table; ratios are B/A.
SPEED_ROWS = (
    ("completed", "completed requests"),
    ("failed", "failed requests"),
    ("request_throughput", "request throughput (req/s)"),
    ("output_throughput", "output throughput (tok/s)"),
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("median_ttft_ms", "median TTFT (ms)"),
    ("p90_ttft_ms", "p90 TTFT (ms)"),
    ("p99_ttft_ms", "p99 TTFT (ms)"),
    ("mean_tpot_ms", "mean TPOT (ms)"),
    ("median_tpot_ms", "median TPOT (ms)"),
    ("p90_tpot_ms", "p90 TPOT (ms)"),
    ("p99_tpot_ms", "p99 TPOT (ms)"),
    ("mean_itl_ms", "mean ITL (ms)"),
    ("median_itl_ms", "median ITL (ms)"),
    ("p90_itl_ms", "p90 ITL (ms)"),
    ("p99_itl_ms", "p99 ITL (ms)"),
    ("mean_e2el_ms", "mean E2E latency (ms)"),
    ("median_e2el_ms", "median E2E latency (ms)"),
    ("p90_e2el_ms", "p90 E2E latency (ms)"),
    ("p99_e2el_ms", "p99 E2E latency (ms)"),
)

QUALITY_ROWS = (
    ("prompts_scored", "prompts scored"),
    ("perplexity_a", "perplexity A"),
    ("perplexity_b", "perplexity B"),
    ("perplexity_ratio", "perplexity B/A"),
    ("mean_delta_nll", "mean delta NLL B-A (nats/token)"),
    ("top1_agreement", "top-1 agreement (%)"),
    ("kl_a_b_topk_lower_bound", "KL(A||B) top-k lower bound (nats)"),
    ("mean_shared_topk_mass_a", "A's mass on shared top-k"),
    ("exact_match_rate", "greedy exact match (%)"),
)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _interval(bounds, percent: bool = False) -> str:
    if not bounds:
        return "n/a"
    low, high = bounds
    return f"[{100 * low:.1f}, {100 * high:.1f}] %" if percent else f"[{low:.4g}, {high:.4g}]"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(r) for r in rows])


@dataclass
class ABReport:
    metadata: dict
    speed: list[dict]
    speed_series: dict
    quality: dict | None
    accounting: dict
    problems: list[str] = field(default_factory=list)
    tasks: dict | None = None  # lm-eval scores of both arms (serve/ab_tasks.py), None without --tasks
    written_to: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """False when any request failed or a comparison was refused: the numbers are partial."""
        return not self.problems

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "complete": self.complete, "problems": self.problems,
                "metadata": self.metadata, "speed": self.speed, "quality": self.quality,
                "tasks": self.tasks, "accounting": self.accounting, "speed_series": self.speed_series}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def speed_level(self, level: str) -> dict:
        for entry in self.speed:
            if entry["level"] == level:
                return entry
        raise KeyError(f"no speed level {level!r}; levels: {[e['level'] for e in self.speed]}")

    def headline(self) -> str:
        """One line for demos and logs: B/A output tokens/s per level (median [min-max] verdict), the main
        quality numbers and the task recoveries."""
        speed = ", ".join(f"{e['level']}: {describe(e.get('ratios', {}).get('output_throughput'))}"
                          for e in self.speed)
        parts = [f"B/A output tok/s {speed}" if speed else "no speed levels"]
        q = self.quality or {}
        if q.get("perplexity_a") is not None and q.get("perplexity_b") is not None:
            parts.append(f"perplexity {_fmt(q['perplexity_a'])} -> {_fmt(q['perplexity_b'])}")
        if q.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {_fmt(q['top1_agreement'])} %")
        if q.get("exact_match_rate") is not None:
            parts.append(f"greedy exact match {_fmt(q['exact_match_rate'])} %")
        if q.get("refused"):
            parts.append("token-level quality REFUSED (different tokenizers)")
        for row in (self.tasks or {}).get("rows", []):
            if row["higher_is_better"] and row["recovery"] is not None:
                parts.append(f"{row['task']} {row['metric']} recovery {100 * row['recovery']:.1f} %")
        if not self.complete:
            parts.append(f"PARTIAL ({len(self.problems)} problems)")
        return "; ".join(parts)

    def _arm_line(self, label: str) -> str:
        arm = self.metadata["arms"][label]
        version = arm.get("server_version") or "unknown version"
        return f"{label}: {arm['model']} at {arm['url']} ({version})"

    def _speed_tables(self, markdown: bool) -> list[str]:
        parts = []
        interval = self.metadata.get("speed_interval", {})
        if self.speed and interval:
            parts += [f"Speed ratios B/A: median of {interval['rounds']} alternating rounds [min-max over the "
                      f"rounds, which holds the median ratio with probability {100 * interval['coverage']:.0f} %]; "
                      "'no difference within the noise' when that range covers 1.0.", ""]
        for entry in self.speed:
            ratios = entry.get("ratios", {})
            rows = [[label, _fmt(entry["A"].get(key)), _fmt(entry["B"].get(key)),
                     describe(ratios.get(key)) if key in ratios else ""]
                    for key, label in SPEED_ROWS]
            rounds = [("-".join(r["order"])) for r in entry.get("rounds", [])]
            title = (f"Speed, {entry['level']} ({len(rounds)} rounds {', '.join(rounds)}; each "
                     f"{entry.get('requests_per_round', '?')} requests per arm, after a warm-up)")
            parts += [f"### {title}" if markdown else title, "",
                      _table(["metric", "A (pooled)", "B (pooled)", "B/A median [min-max] verdict"], rows,
                             markdown), ""]
            parts += [f"SKIPPED {label}: {entry[label]['skipped']}" for label in ("A", "B")
                      if entry[label].get("skipped")]
        return parts

    def _quality_table(self, markdown: bool) -> list[str]:
        if self.quality is None:
            return ["Quality: not measured (--no-quality)", ""]
        rows = [[label, _fmt(self.quality.get(key))] for key, label in QUALITY_ROWS]
        parts = ["### Quality" if markdown else "Quality", "", _table(["metric", "value"], rows, markdown), ""]
        if self.quality.get("refused"):
            parts += [f"REFUSED: {self.quality['refused']}", ""]
        return parts

    def _tasks_table(self, markdown: bool) -> list[str]:
        if self.tasks is None:
            return []
        settings = self.tasks["settings"]
        head = "### Tasks (lm-evaluation-harness)" if markdown else "Tasks (lm-evaluation-harness)"
        lines = [head, "", f"lm-eval {self.tasks.get('lm_eval_version')}, local-completions on both arms; "
                 f"few-shot {settings['num_fewshot'] if settings['num_fewshot'] is not None else 'task default'}, "
                 f"seed {settings['seed']}, limit {settings['limit'] or 'none'}, batch {settings['batch_size']}; "
                 f"intervals: 95 % paired bootstrap over documents ({settings['bootstrap_resamples']} resamples)", ""]
        rows = []
        for row in self.tasks.get("rows", []):
            better = {True: "higher", False: "lower", None: "?"}[row["higher_is_better"]]
            rows.append([row["task"], f"{row['metric']} ({better} is better)", _fmt(row["documents"]),
                         _fmt(row["a"]), _fmt(row["b"]), _percent(row["recovery"]),
                         _interval(row["recovery_interval"], percent=True), _fmt(row["difference"]),
                         _interval(row["difference_interval"]), row["verdict"] or ""])
        if rows:
            lines += [_table(["task", "metric", "docs", "A", "B", "B/A (recovery)", "B/A 95 %", "B-A",
                              "B-A 95 %", "verdict"], rows, markdown), ""]
        else:
            lines += ["no task scores (see the problems above)", ""]
        return lines

    def _problems(self, markdown: bool) -> list[str]:
        if not self.problems:
            return ["Complete: every request succeeded.", ""]
        head = "### PARTIAL RESULTS" if markdown else "PARTIAL RESULTS:"
        return [head, ""] + [f"- {p}" for p in self.problems] + [""]

    def _render(self, markdown: bool) -> str:
        prompts = self.metadata["prompts"]
        lines = ["## A/B report" if markdown else "A/B report", "",
                 ("- " if markdown else "") + self._arm_line("A"),
                 ("- " if markdown else "") + self._arm_line("B"),
                 ("- " if markdown else "") + f"prompts: {prompts['count']} from {prompts['source']} "
                 f"(sha256 {prompts['sha256'][:12]})",
                 ("- " if markdown else "") + f"run: {self.metadata['started_at']}, "
                 f"{self.metadata['duration_s']:.0f} s", ""]
        lines += (self._problems(markdown) + self._speed_tables(markdown) + self._quality_table(markdown)
                  + self._tasks_table(markdown))
        return "\n".join(lines).rstrip() + "\n"

    def to_markdown(self) -> str:
        return self._render(markdown=True)

    def to_console(self) -> str:
        return self._render(markdown=False)

    def write(self, out_dir: Path, plots: bool = True) -> list[Path]:
        """ab-report-<time>.json and .md (and PNG plots) under out_dir; returns the paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.metadata["started_at"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
        base = out_dir / f"ab-report-{stamp}"
        json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
        json_path.write_text(self.to_json())
        paths = [json_path, md_path]
        if plots:
            from serve.ab_plots import write_plots

            paths += write_plots(self, out_dir, base.name)
        markdown = self.to_markdown()
        pngs = [p for p in paths if p.suffix == ".png"]
        if pngs:
            markdown += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
        md_path.write_text(markdown)
        self.written_to = paths
        logger.info("A/B report written: %s", ", ".join(str(p) for p in paths))
        return paths


def load_report(path: Path) -> dict:
    """Read an ab-report JSON file (the dict written by ABReport.write)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an A/B report of schema {SCHEMA} (schema={data.get('schema')!r})")
    return data
