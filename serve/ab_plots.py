"""PNG plots of an A/B report: latency CDFs per arm and output tokens/s against load."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ARM_STYLES = {"A": {"color": "tab:blue"}, "B": {"color": "tab:orange"}}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def plot_latency_cdf(report, path: Path) -> Path | None:
    """E2E latency and TTFT CDFs: one column per load level, one line per arm (successful requests)."""
    levels = list(report.speed_series)
    if not levels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(levels), figsize=(4.2 * len(levels) + 1, 7), squeeze=False)
    drawn = False
    for column, level in enumerate(levels):
        for label, series in report.speed_series[level].items():
            ok = [i for i, e in enumerate(series["errors"]) if not e]
            for row, key in enumerate(("latencies", "ttfts")):
                values = [series[key][i] * 1000 for i in ok]
                if values:
                    xs, ys = _cdf(values)
                    model = report.metadata["arms"][label]["model"]
                    axes[row][column].step(xs, ys, where="post", label=f"{label}: {model}",
                                           **ARM_STYLES.get(label, {}))
                    drawn = True
        for row, title in enumerate(("end-to-end latency", "time to first token")):
            ax = axes[row][column]
            ax.set_xlabel(f"{title} (ms)")
            ax.set_title(f"{title}, {level}", fontsize=9)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel("fraction of requests")
    if not drawn:
        plt.close(fig)
        logger.warning("no successful request to plot a latency CDF from")
        return None
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(report, path: Path) -> Path | None:
    """Output tokens/s per arm against concurrency (or request rate)."""
    if not report.speed:
        return None
    plt = _pyplot()
    by_concurrency = report.speed[0]["max_concurrency"] is not None
    xs = [e["max_concurrency"] if by_concurrency else e["request_rate"] for e in report.speed]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label in ("A", "B"):
        model = report.metadata["arms"][label]["model"]
        ys = [e[label].get("output_throughput", float("nan")) for e in report.speed]
        ax.plot(xs, ys, marker="o", label=f"{label}: {model}", **ARM_STYLES[label])
    ax.set_xlabel("max concurrency" if by_concurrency else "request rate (req/s)")
    if by_concurrency and len(set(xs)) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylabel("output tokens/s")
    ax.set_title("output throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report, out_dir: Path, base_name: str) -> list[Path]:
    written = [plot_latency_cdf(report, out_dir / f"{base_name}-latency-cdf.png"),
               plot_throughput(report, out_dir / f"{base_name}-throughput.png")]
    return [p for p in written if p is not None]
