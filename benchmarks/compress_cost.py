"""Cost model of a full `moesvd compress` (docs/performance.md, "Compression at scale"): FLOPs of the
calibration (per token, per layer) and of the fits (per layer), memory per rank, and the time they project
for W ranks at given sustained rates. Counts follow the code: offline/pipeline.py (passes),
offline/calibration.py (hook and Grams), offline/methods/shared_basis.py and offline/decompose.py (fits).

    python -m benchmarks.compress_cost [--tokens 524288] [--ranks 1 8] [--rank 1216] [--kept 384]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:  # Qwen3-30B-A3B
    layers: int = 48
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 128
    top_k: int = 8
    intermediate: int = 768
    seq_len: int = 2048


def per_token_flops(s: Shape) -> dict[str, float]:
    """FLOPs (2 per multiply-add) per calibration token and MoE layer, by pass and precision."""
    h, i, k = s.hidden, s.intermediate, s.top_k
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    forward = 2 * (h * q + 2 * h * kv + q * h) + 2 * 2 * q * s.seq_len / 2 + 2 * h * s.experts + k * 2 * 3 * h * i
    activations = k * 2 * 2 * h * i  # act(gate x) * (up x) of the routed experts, recomputed by the hook
    hook_grams = k * 2 * i * i + 2 * 2 * h * h  # intermediate prior, layer and output Grams (float32 GEMMs)
    expert_grams = k * 2 * h * h + 2 * (k * 2 * i * i)  # input Grams; intermediate ones twice (selection, fit)
    return {
        "sensitivity_bf16": 2 * (forward + activations),  # statistics run + outlier run
        "decomposition_bf16": forward + activations + 2 * activations + forward,  # + recompute, + compressed run
        "decomposition_fp32": hook_grams + expert_grams,
    }


def per_layer_fit_flops(s: Shape, rank: int, kept: int) -> dict[str, float]:
    """Token-independent FLOPs per MoE layer: fits (float64), bases (float32), selection, principal ranks."""
    h, i, e = s.hidden, s.intermediate, s.experts
    # the fits see the selected experts in their full shape (dropped rows and columns are zero): 2I rows
    fit = 2 * (rank * h * h + h * h * 2 * i + rank * h * rank + rank * h * 2 * i)  # A C, C W^T, A C A^T, A C W^T
    fit += rank ** 3 / 3 + 2 * rank * rank * 2 * i  # Cholesky + solve
    fit += 2 * (2 * h * i * i + 2 * rank * h * i)  # down error, D = B^T W_down and B D
    selection = 2 * i ** 3 + (i - kept) * 4 * 2 * i * i  # inverse + rank-1 updates per removal
    return {"fits_fp64": e * fit, "selection_fp64": e * selection,
            "bases_fp32": e * 2 * 2 * i * h * h + 9 * h ** 3,
            "principal_ranks_fp64": 3 * e * (2 * i * i * h + 4 / 3 * i ** 3)}


def memory_per_rank_gib(s: Shape, tokens: int, ranks: int) -> dict[str, float]:
    """Resident bytes per rank (device memory on GPUs): one bf16 layer, the hidden states in and out and the
    kept MoE inputs of this rank's windows (bf16), the float64 Grams of the layer and of one expert."""
    gib = 2 ** 30
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = 2 * (s.experts * 3 * s.hidden * s.intermediate + 2 * s.hidden * q + 2 * s.hidden * kv)
    mine = tokens / ranks
    return {"layer": layer / gib, "stream_in_out_and_moe_inputs": 3 * mine * s.hidden * 2 / gib,
            "grams": (3 * s.hidden ** 2 + 2 * s.intermediate ** 2 + s.hidden ** 2) * 8 / gib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256 * 2048, help="calibration tokens (paper: 256 x 2048)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rank", type=int, default=1600, help="shared-basis rank r")
    parser.add_argument("--kept", type=int, default=384, help="kept intermediate neurons I'")
    args = parser.parse_args()
    s = Shape()
    token = per_token_flops(s)
    fit = per_layer_fit_flops(s, args.rank, args.kept)
    out = {"shape": asdict(s), "tokens": args.tokens,
           "per_token_per_layer_gflop": {k: v / 1e9 for k, v in token.items()},
           "per_layer_calibration_tflop": {k: v * args.tokens / 1e12 for k, v in token.items()},
           "per_layer_fit_tflop": {k: v / 1e12 for k, v in fit.items()},
           "model_pflop": (sum(token.values()) * args.tokens + sum(fit.values())) * s.layers / 1e15,
           "memory_per_rank_gib": {str(w): memory_per_rank_gib(s, args.tokens, w) for w in args.ranks}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
