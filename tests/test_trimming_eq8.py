"""U-trimming by Eq. 8 as printed (`trim_combine="sum"`, issue 13): a trimmed expert's factors are the sum
of its group's kept experts' factors, E_i(x) = (U_1 S_1 + U_2 S_2) V_s^T x, stored as its own bank."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moesvd_vllm.format.schema import read_moe_svd_config
from offline.compress import CompressionOptions, OptionsError, compress

CALIB = Path(__file__).resolve().parent.parent / "offline" / "bundled" / "kjv_text" / "validation.txt"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4)
PROJECTIONS = ("w1", "w3", "w2")  # mixtral's gate, up, down


def _banks(out: Path, layer: int, num_banks: int) -> list[list[torch.Tensor]]:
    tensors = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if f"layers.{layer}." in k})
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    return [[tensors[f"{prefix}.{b}.{p}.weight"] for p in PROJECTIONS] for b in range(num_banks)]


def _sum(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    # what the compressor stores: the float32 sum rounded once to the stored dtype
    return [(x.float() + y.float()).to(x.dtype) for x, y in zip(a, b)]


def test_eq8_stores_each_trimmed_expert_as_the_sum_of_its_groups_two_kept_experts(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("mixtral")  # 8 experts: one trimming group, 2 kept
    options = CompressionOptions(ratio=0.3, calib=str(CALIB), method="moe-svd", trim_combine="sum", **SMALL)
    out = compress(dense, tmp_path / "eq8", options)
    block = read_moe_svd_config(out)
    assert block.options["trim_combine"] == "sum"
    for layer, spec in block.layers.items():
        # served, every expert needs its own matrix: no bank is shared, so Eq. 8 saves nothing in memory
        assert spec.bank_map == list(range(spec.num_experts))
        banks = _banks(out, int(layer), spec.num_banks)
        pairs = [(k1, k2) for k1, k2 in itertools.combinations(range(spec.num_banks), 2)
                 if all(all(torch.equal(s, t) for s, t in zip(_sum(banks[k1], banks[k2]), banks[e]))
                        for e in range(spec.num_banks) if e not in (k1, k2))]
        assert len(pairs) == 1, (layer, pairs)  # exactly one kept pair; the other six are its sums
        k1, k2 = pairs[0]
        assert not all(torch.equal(s, t) for s, t in zip(banks[k1], banks[k2]))


def test_eq8_counts_a_bank_per_expert_and_algorithm_3_shares_two(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("mixtral")
    one = read_moe_svd_config(compress(dense, tmp_path / "one", CompressionOptions(
        ratio=0.35, calib=str(CALIB), method="moe-svd", ratio_tolerance=0.02, **SMALL)))
    summed = read_moe_svd_config(compress(dense, tmp_path / "sum", CompressionOptions(
        ratio=0.35, calib=str(CALIB), method="moe-svd", trim_combine="sum", ratio_tolerance=0.02, **SMALL)))
    assert all(spec.num_banks == 2 for spec in one.layers.values())
    assert all(spec.num_banks == spec.num_experts for spec in summed.layers.values())
    # same target ratio: with 8 banks per layer instead of 2, Eq. 8 must keep a lower rank
    assert max(s.rank for s in summed.layers.values()) < max(s.rank for s in one.layers.values())


def test_unknown_trim_combine_is_a_clear_error():
    with pytest.raises(OptionsError, match="trim_combine 'mean' is not one of"):
        CompressionOptions(ratio=0.3, calib=str(CALIB), method="moe-svd", trim_combine="mean")
