"""The ratio table of the performance benchmark: compressed / dense, measured side by side, with the
ideal (the ratio of routed-expert bytes) and two sharper bounds beside each measured ratio.

Bounds, for a layer with E experts (top-k), hidden H, intermediate I, and a compressed layer of rank r
keeping I' neurons per expert (format v2; I' = I for rank reduction alone), B bytes per element. The
compressed parameter count is the schema's `decomposed_layer_params` (bases 2 r H, or none when
`bases: false` at r = H, plus E 3 I' r factors):
* bytes ideal (the target's reference): all expert bytes, dense E 3 I H vs compressed 2 r H + E 3 I' r
  (bases in their own dtype). A memory-bound block that reads every expert matches it.
* touched-bytes bound at T tokens: only the experts some token picks are read. With near-uniform
  routing u(T) = E (1 - (1 - k/E)^T) experts are touched; the bases are read at any T.
* FLOP bound: dense k 3 I H multiply-adds per token vs compressed 2 r H + k 3 I' r (the bases cost
  per token, not per expert). A compute-bound block (many tokens) cannot beat it.
A model whose layers differ (real compressor output) sums both sides over its layers (ModelGeometry).
vLLM's x86 CPU fused-MoE kernel pads the intermediate size to a multiple of 32
(X86CPUUnquantizedExperts: output and reduction alignment 32), so a kept I' that is only a multiple
of 8 (464 of 768) runs, and is resident, as round_up(I', 32) (480): `padded()` gives those bounds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from moesvd_vllm.architectures import MoEDims

from moesvd_vllm.format.schema import LayerSpec, decomposed_layer_params

_DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
KERNEL_INTERMEDIATE_ALIGNMENT = 32  # vLLM X86CPUUnquantizedExperts pads I to a multiple of this


def padded_intermediate(intermediate: int) -> int:
    """The intermediate size vLLM's x86 CPU fused-MoE kernel holds and computes for `intermediate`."""
    step = KERNEL_INTERMEDIATE_ALIGNMENT
    return -(-intermediate // step) * step


@dataclass(frozen=True)
class LayerGeometry:
    dims: MoEDims
    rank: int
    expert_bytes: float = 2.0  # bytes per factor element (bf16)
    basis_bytes: float = 2.0  # bytes per basis element
    intermediate: int | None = None  # I' kept neurons per expert (None: the model's I)
    bases: bool = True  # False: no shared bases (neuron selection alone, r = H)
    num_banks: int | None = None  # expert banks (None: one per expert)
    basis_groups: int = 1  # G pairs of bases (format version 4; E: every expert its own)

    @classmethod
    def from_spec(cls, dims: MoEDims, spec: LayerSpec, expert_bytes: float = 2.0) -> "LayerGeometry":
        return cls(dims, spec.rank, expert_bytes=expert_bytes, basis_bytes=_DTYPE_BYTES[spec.basis_dtype],
                   intermediate=spec.kept_intermediate(dims), bases=spec.bases, num_banks=spec.num_banks,
                   basis_groups=spec.basis_groups)

    def spec(self) -> LayerSpec:
        banks = self.num_banks or self.dims.num_experts
        return LayerSpec(form="shared_basis", rank=self.rank, num_experts=self.dims.num_experts,
                         bank_map=[e % banks for e in range(self.dims.num_experts)],
                         intermediate=self.intermediate, bases=self.bases, basis_groups=self.basis_groups)

    def padded(self) -> "LayerGeometry":
        """This layer as the kernel holds it (I' rounded up to the kernel's alignment)."""
        kept = self.intermediate or self.dims.intermediate
        return self if kept % KERNEL_INTERMEDIATE_ALIGNMENT == 0 else replace(
            self, intermediate=padded_intermediate(kept))

    def basis_params(self) -> int:
        return 2 * self.basis_groups * self.rank * self.dims.hidden if self.bases else 0

    def factor_params(self) -> int:
        """Expert factors of all banks: the schema's count minus the bases."""
        return decomposed_layer_params(self.spec(), self.dims) - self.basis_params()

    def touched_experts(self, tokens: int) -> float:
        e, k = self.dims.num_experts, self.dims.top_k
        return e * (1.0 - (1.0 - k / e) ** tokens)

    def dense_bytes(self, experts: float | None = None) -> float:
        d = self.dims
        return (d.num_experts if experts is None else experts) * 3 * d.intermediate * d.hidden * self.expert_bytes

    def compressed_bytes(self, experts: float | None = None) -> float:
        """Bases plus the factors of `experts` experts' banks (None: all of them)."""
        share = 1.0 if experts is None else experts / self.dims.num_experts
        # one pair of bases per expert: a token reads only its experts' pairs (moesvd_vllm/grouped_bases.py)
        basis_share = share if self.basis_groups == self.dims.num_experts else 1.0
        return (basis_share * self.basis_params() * self.basis_bytes
                + share * self.factor_params() * self.expert_bytes)

    def dense_flops(self) -> float:
        d = self.dims
        return d.top_k * 3 * d.intermediate * d.hidden

    def compressed_flops(self) -> float:
        per_expert = self.factor_params() / (self.num_banks or self.dims.num_experts)
        # each routed pair runs through its group's pair of bases only (moesvd_vllm/grouped_bases.py)
        bases = self.basis_params()
        if self.basis_groups > 1:
            bases = self.dims.top_k * bases / self.basis_groups
        return bases + self.dims.top_k * per_expert

    def bytes_ideal(self) -> float:
        return self.dense_bytes() / self.compressed_bytes()

    def touched_bytes_bound(self, tokens: int) -> float:
        u = self.touched_experts(tokens)
        return self.dense_bytes(u) / self.compressed_bytes(u)

    def flop_bound(self) -> float:
        return self.dense_flops() / self.compressed_flops()


@dataclass(frozen=True)
class ModelGeometry:
    """All compressed layers of a model: each bound sums the dense and the compressed side over layers."""

    layers: tuple[LayerGeometry, ...]

    @classmethod
    def from_specs(cls, dims: MoEDims, specs: list[LayerSpec]) -> "ModelGeometry":
        return cls(tuple(LayerGeometry.from_spec(dims, spec) for spec in specs))

    def padded(self) -> "ModelGeometry":
        return ModelGeometry(tuple(g.padded() for g in self.layers))

    def compressed_params(self) -> int:
        """Expert parameters of all layers (the schema's count; ParamCounts.expert_compressed)."""
        return sum(g.basis_params() + g.factor_params() for g in self.layers)

    def bytes_ideal(self) -> float:
        return sum(g.dense_bytes() for g in self.layers) / sum(g.compressed_bytes() for g in self.layers)

    def touched_bytes_bound(self, tokens: int) -> float:
        touched = [g.touched_experts(tokens) for g in self.layers]
        return (sum(g.dense_bytes(u) for g, u in zip(self.layers, touched))
                / sum(g.compressed_bytes(u) for g, u in zip(self.layers, touched)))

    def flop_bound(self) -> float:
        return sum(g.dense_flops() for g in self.layers) / sum(g.compressed_flops() for g in self.layers)


def layer_shape_label(dims: MoEDims, specs: list[LayerSpec]) -> str:
    """"r=1216", "I'=464, no bases", "I'=384, r=1024" (or "mixed" when the layers differ)."""
    labels = set()
    for spec in specs:
        parts = []
        if spec.kept_intermediate(dims) != dims.intermediate:
            parts.append(f"I'={spec.kept_intermediate(dims)}")
        parts.append(f"r={spec.rank}" if spec.bases else "no bases")
        if spec.bases and spec.basis_dtype != "bfloat16":
            parts.append(f"{spec.basis_dtype} bases")
        if spec.num_banks != spec.num_experts:
            parts.append(f"{spec.num_banks} banks")
        labels.add(", ".join(parts))
    return labels.pop() if len(labels) == 1 else "mixed layers"


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
    header = ["ratio (layer shape)", "metric", "dense", "compressed", "speedup", "ideal (bytes)", "of ideal",
              "ideal with vLLM's I' padding", "bound (touched bytes / FLOPs)"]
    rows = []
    for pair in summary["pairs"]:
        label = pair_label(pair)
        ideal = pair["ideal_bytes_ratio"]
        for row in pair["rows"]:
            of_ideal = None if row["speedup"] is None else row["speedup"] / ideal
            rows.append([label, row["metric"], fmt(row["dense"], 1), fmt(row["compressed"], 1),
                         fmt(row["speedup"], 2, "x"), fmt(ideal, 2, "x"), fmt(of_ideal and 100 * of_ideal, 0, "%"),
                         fmt(pair.get("padded_ideal_bytes_ratio"), 2, "x"), fmt(row.get("bound"), 2, "x")])
    return header, rows


def pair_label(pair: dict) -> str:
    """"40 % (r=1216)", "40 % neurons (I'=464, no bases)"."""
    kind = " neurons" if pair.get("neurons") else ""
    return f"{pair['ratio']:.0%}{kind} ({pair['shape']})"


def weight_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "promised expert params", "resident expert params", "deviation",
              "deviation from padded I'", "resident bytes", "bytes/param", "worker RSS"]
    rows = []
    for pair in summary["pairs"]:
        w = pair["weights"]
        rows.append([pair_label(pair), f"{w['promised']:,}", f"{w['resident']:,}",
                     fmt(100 * w["deviation"], 3, "%"), fmt(100 * w.get("deviation_from_padded", 0.0), 3, "%"), f"{w['resident_bytes'] / 1e9:.3f} GB",
                     fmt(w["resident_bytes"] / max(w["resident"], 1), 2),
                     f"{w['worker_rss_bytes'] / 1e9:.2f} GB"])
    dense = summary.get("dense_weights")
    if dense:
        rows.insert(0, ["dense", f"{dense['promised']:,}", f"{dense['resident']:,}",
                        fmt(100 * dense["deviation"], 3, "%"), fmt(100 * dense["deviation"], 3, "%"),
                        f"{dense['resident_bytes'] / 1e9:.3f} GB",
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
