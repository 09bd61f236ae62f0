"""Positive control for U-trimming (Eq. 7-8, issue 13): on a model whose experts come in near-duplicate
pairs, trimming one expert of each pair must be near-lossless at zero noise and lose more as noise grows.

The model: the bundled moe_mini with, in every layer, experts 4-7 replaced by copies of experts 0-3 plus
Gaussian noise of `noise` times each weight's standard deviation, and router rows 4-7 copies of rows 0-3
lowered by 3 (the copies are routed less, so U-trimming's frequency rule keeps the originals). With
`trim_keep` 4 per group of 8 the paper's method serves each copy with its original's factors, at full rank.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesvd_vllm.format.schema import read_moe_svd_config
from offline.bundled import bundled_model_dir, read_split
from offline.compress import CompressionOptions, compress
from offline.eval_ppl import evaluate_perplexity

PAIRS = 4
EVAL_TEXT_CHARS = 24_000


def duplicated_model(out, noise: float, seed: int = 0):
    source = bundled_model_dir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    tensors = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        for copy in range(PAIRS, 2 * PAIRS):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                original = tensors[f"{prefix}.experts.{copy - PAIRS}.{projection}.weight"]
                perturbation = torch.randn(original.shape, generator=generator) * original.std() * noise
                tensors[f"{prefix}.experts.{copy}.{projection}.weight"] = original + perturbation
        router = tensors[f"{prefix}.gate.weight"].clone()
        router[PAIRS:] = router[:PAIRS] - 3.0 / router[:PAIRS].norm(dim=1, keepdim=True) * router[:PAIRS]
        tensors[f"{prefix}.gate.weight"] = router
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "train.txt"
    path.write_text(read_split("train")[:200_000])
    return path


def _trimmed_ppl_ratio(tmp_path, calib_file, noise: float) -> tuple[float, list[list[int]]]:
    """ppl(trimmed) / ppl(dense) of the duplicated model on validation text, and each layer's bank map."""
    dense_dir = tmp_path / f"dense-{noise}"
    dense_dir.mkdir()
    duplicated_model(dense_dir, noise)
    out = tmp_path / f"trimmed-{noise}"
    compress(dense_dir, out, CompressionOptions(
        ratio=0.46, calib=str(calib_file), method="moe-svd", trim_keep=PAIRS, trim_group_size=2 * PAIRS,
        num_samples=32, seq_len=256, ratio_tolerance=0.05, force=True))
    text = read_split("validation")[:EVAL_TEXT_CHARS]
    dense = evaluate_perplexity(dense_dir, text, seq_len=256).ppl
    trimmed = evaluate_perplexity(out, text, seq_len=256).ppl
    block = read_moe_svd_config(out)
    return trimmed / dense, [spec.bank_map for spec in block.layers.values()]


def test_trimming_is_near_lossless_on_duplicated_experts_and_degrades_with_noise(tmp_path, calib_file):
    exact, bank_maps = _trimmed_ppl_ratio(tmp_path, calib_file, noise=0.0)
    # each copy is served by its original: bank_map[e + PAIRS] == bank_map[e]
    for bank_map in bank_maps:
        assert bank_map[PAIRS:] == bank_map[:PAIRS], bank_map
    # full-rank bases in float32: the trimmed model equals the dense one up to float32 rounding of the
    # factors (measured: ratio 0.99999994); 1e-3 is far above that and below the noisy case
    assert abs(exact - 1.0) < 1e-3, exact
    # noise of 0.5 std on the (less routed) copies: measured 1.0055, i.e. trimming is no longer free
    noisy, _ = _trimmed_ppl_ratio(tmp_path, calib_file, noise=0.5)
    assert noisy > exact + 1e-3, (noisy, exact)
