"""The ratio table of the performance benchmark: compressed / dense, measured side by side, with the
ideal (the ratio of routed-expert bytes) and two sharper bounds beside each measured ratio.

Bounds, for a layer with E experts (top-k), hidden H, intermediate I, rank r, B bytes per element:
* bytes ideal (the target's reference): all expert bytes, dense E 3 I H vs compressed 2 r H + E 3 I r
  (bases in their own dtype). A memory-bound block that reads every expert matches it.
* touched-bytes bound at T tokens: only the experts some token picks are read. With near-uniform
  routing u(T) = E (1 - (1 - k/E)^T) experts are touched; the bases are read at any T.
* FLOP bound: dense k 3 I H multiply-adds per token vs compressed 2 r H + k 3 I r (the bases cost
  per token, not per expert). A compute-bound block (many tokens) cannot beat it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from moesvd_vllm.schema import MoEDims


@dataclass(frozen=True)
class LayerGeometry:
    dims: MoEDims
    rank: int
    expert_bytes: float = 2.0  # bytes per factor element (bf16)
    basis_bytes: float = 2.0  # bytes per basis element

    def touched_experts(self, tokens: int) -> float:
        e, k = self.dims.num_experts, self.dims.top_k
        return e * (1.0 - (1.0 - k / e) ** tokens)

    def bytes_ideal(self) -> float:
        d, r = self.dims, self.rank
        dense = d.num_experts * 3 * d.intermediate * d.hidden * self.expert_bytes
        compressed = 2 * r * d.hidden * self.basis_bytes + d.num_experts * 3 * d.intermediate * r * self.expert_bytes
        return dense / compressed

    def touched_bytes_bound(self, tokens: int) -> float:
        d, r, u = self.dims, self.rank, self.touched_experts(tokens)
        dense = u * 3 * d.intermediate * d.hidden * self.expert_bytes
        compressed = 2 * r * d.hidden * self.basis_bytes + u * 3 * d.intermediate * r * self.expert_bytes
        return dense / compressed

    def flop_bound(self) -> float:
        d, r = self.dims, self.rank
        dense = d.top_k * 3 * d.intermediate * d.hidden
        return dense / (2 * r * d.hidden + d.top_k * 3 * d.intermediate * r)


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def speedup(dense: float | None, compressed: float | None, *, higher_is_better: bool) -> float | None:
    """How many times faster the compressed model is (>1: faster)."""
    if not dense or not compressed:
        return None
    return compressed / dense if higher_is_better else dense / compressed


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per (ratio, metric): measured speedup, ideal, measured / ideal, and the sharper bound."""
    header = ["ratio (rank)", "metric", "dense", "compressed", "speedup", "ideal (bytes)", "of ideal",
              "bound (touched bytes / FLOPs)"]
    rows = []
    for pair in summary["pairs"]:
        label = f"{pair['ratio']:.0%} (r={pair['rank']}" + (
            ")" if pair.get("basis_dtype", "bfloat16") == "bfloat16" else f", {pair['basis_dtype']} bases)")
        ideal = pair["ideal_bytes_ratio"]
        for row in pair["rows"]:
            of_ideal = None if row["speedup"] is None else row["speedup"] / ideal
            rows.append([label, row["metric"], fmt(row["dense"], 1), fmt(row["compressed"], 1),
                         fmt(row["speedup"], 2, "x"), fmt(ideal, 2, "x"), fmt(of_ideal and 100 * of_ideal, 0, "%"),
                         fmt(row.get("bound"), 2, "x")])
    return header, rows


def weight_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["ratio", "promised expert params", "resident expert params", "deviation", "resident bytes",
              "bytes/param", "worker RSS"]
    rows = []
    for pair in summary["pairs"]:
        w = pair["weights"]
        rows.append([f"{pair['ratio']:.0%}" + ("" if pair.get("basis_dtype", "bfloat16") == "bfloat16"
                                                 else f" ({pair['basis_dtype']} bases)"), f"{w['promised']:,}", f"{w['resident']:,}",
                     fmt(100 * w["deviation"], 3, "%"), f"{w['resident_bytes'] / 1e9:.3f} GB",
                     fmt(w["resident_bytes"] / max(w["resident"], 1), 2),
                     f"{w['worker_rss_bytes'] / 1e9:.2f} GB"])
    dense = summary.get("dense_weights")
    if dense:
        rows.insert(0, ["dense", f"{dense['promised']:,}", f"{dense['resident']:,}",
                        fmt(100 * dense["deviation"], 3, "%"), f"{dense['resident_bytes'] / 1e9:.3f} GB",
                        fmt(dense["resident_bytes"] / max(dense["resident"], 1), 2),
                        f"{dense['worker_rss_bytes'] / 1e9:.2f} GB"])
    return header, rows


def compression_rows(costs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["ratio", "layers", "wall s", "s / layer", "peak RSS", "peak / one layer's expert bytes"]
    rows = [[f"{c['ratio']:.0%}", str(c["layers"]), fmt(c["seconds"], 0), fmt(c["seconds_per_layer"], 1),
             f"{c['peak_rss_bytes'] / 1e9:.2f} GB", fmt(c["peak_over_layer_bytes"], 2, "x")] for c in costs]
    return header, rows


def profile_rows(profiles: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """Per engine and token count: total self time and its split by category."""
    categories = ("fused_moe_kernel", "gemm", "routing", "casts_copies", "other")
    header = ["model", "tokens", "total ms"] + [f"{c} ms" for c in categories]
    rows = []
    for name, items in profiles.items():
        for p in items:
            split = p["categories_ms"]
            rows.append([name, str(p["num_tokens"]), fmt(p["total_ms"], 1)]
                        + [fmt(split.get(c, 0.0), 1) for c in categories])
    return header, rows
