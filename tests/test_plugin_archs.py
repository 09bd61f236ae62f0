"""Every served MoE architecture, compressed by `moesvd compress` and served by vLLM, equals the reference.

One mechanism serves them all (moesvd_vllm/models.py: vLLM's own model class with the MoE-SVD quantization
config): the architecture's own attention, router (Qwen2-MoE's gated shared expert, DeepSeek-V2's shared
experts and dense first layer, DeepSeek-V3's and GLM-4.5's sigmoid grouped top-k with score-correction
bias and routed scaling, PhiMoE's sparsemixer), and only the routed experts of decomposed layers change.
DeepSeek's MLA fixtures have their RoPE parts zeroed (tests/support/plugin.py, MLA_ARCHS). Each architecture's tiny fixture is compressed with the `banks` recipe (U-trimming into banks,
kept neurons, low-rank shared bases: every part of the serving path) and served in float32; greedy tokens
must equal `offline.reference`'s and logprobs agree within 1e-3. Qwen3-MoE and Mixtral are covered in
tests/test_plugin.py. A bf16 checkpoint served with --dtype float32 is checked here too: its bases are
computed in float32 (the wider dtype), so it matches the float32 reference as closely as a float32
checkpoint does.
"""

from __future__ import annotations

import logging

import pytest

from moesvd_vllm.format.schema import read_moe_svd_config
from tests.support.plugin import arch_server_options, float32_tolerance, reference_difference

logger = logging.getLogger(__name__)

ARCHITECTURES = [
    "deepseek_v3",  # MLA: the most different layout stays in the default set (qwen3_moe and mixtral: test_plugin.py)
    pytest.param("qwen2_moe", marks=pytest.mark.slow),
    pytest.param("olmoe", marks=pytest.mark.slow),
    pytest.param("phimoe", marks=pytest.mark.slow),
    pytest.param("deepseek_v2", marks=pytest.mark.slow),
    pytest.param("glm4_moe", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compressed_architecture_matches_reference(compressed_checkpoint, served_scores, arch):
    model_dir = compressed_checkpoint(arch, "banks")
    config = read_moe_svd_config(model_dir)
    assert config.layers, f"{arch}: nothing was decomposed"
    assert any(spec.num_banks < spec.num_experts for spec in config.layers.values()), "no banks"
    logger.info("%s layers (rank, banks, kept neurons, bases): %s", arch,
                {k: (s.rank, s.num_banks, s.intermediate, s.bases) for k, s in config.layers.items()})
    served = served_scores(model_dir, **arch_server_options(arch))
    difference = reference_difference(model_dir, served.scores)
    logger.info("compressed %s: plugin vs reference max |logprob diff| %.2e, server ready in %.0f s",
                arch, difference, served.startup_seconds)
    assert difference <= float32_tolerance(model_dir, served.scores)


def test_bfloat16_checkpoint_served_in_float32_keeps_float32_bases(compressed_checkpoint, served_scores):
    """bf16 factors and bf16 bases served with --dtype float32: computed in float32 end to end.

    Casting activations to the bases' bf16 (the previous plugin did) costs about 1e-2 in logprobs; in
    float32 the served model equals the float32 reference of the same (bf16-valued) weights to float32
    noise, the same tolerance as a float32 checkpoint.
    """
    model_dir = compressed_checkpoint("qwen3_moe", "banks", dtype="bfloat16")
    config = read_moe_svd_config(model_dir)
    assert all(spec.basis_dtype == "bfloat16" and spec.bases for spec in config.layers.values())
    served = served_scores(model_dir, dtype="float32")
    difference = reference_difference(model_dir, served.scores, dtype="float32")
    logger.info("bf16 checkpoint served in float32 vs float32 reference: max |logprob diff| %.2e", difference)
    assert difference <= float32_tolerance(model_dir, served.scores)


@pytest.mark.slow
def test_compressed_qwen3_next_in_bfloat16_matches_reference(compressed_checkpoint, served_scores):
    """qwen3_next (Gated DeltaNet + gated attention, a gated shared expert): vLLM 0.32 runs its linear
    attention on CPU in bfloat16 only, so the compressed checkpoint is served in bf16 and compared with the
    float32 reference of the same bf16 weights, within the bf16 rounding bound of
    tests/test_vllm_serving_stock.py (greedy tokens compared up to the first near-tie divergence)."""
    from offline.reference import load_reference_model
    from tests.support.plugin import max_logprob_difference, prompt_token_ids, reference_score
    from tests.test_vllm_serving_stock import bf16_logprob_tolerance

    model_dir = compressed_checkpoint("qwen3_next", "banks", dtype="bfloat16")
    config = read_moe_svd_config(model_dir)
    assert config.layers and any(s.num_banks < s.num_experts for s in config.layers.values())
    served = served_scores(model_dir, dtype="bfloat16")
    import torch

    model = load_reference_model(model_dir, dtype="float32").eval()
    prompts = prompt_token_ids(model_dir)
    with torch.no_grad():
        reference = reference_score(model, prompts)
        max_logit = max(float(model(torch.tensor([ids])).logits.abs().max()) for ids in prompts)
    difference = max_logprob_difference(served.scores, reference)
    tolerance = bf16_logprob_tolerance(max_logit, model.config.num_hidden_layers)
    logger.info("compressed qwen3_next (bf16): plugin vs float32 reference max |logprob diff| %.2e "
                "(bf16 bound %.2e), server ready in %.0f s", difference, tolerance, served.startup_seconds)
    assert served.scores[0].tokens[:2] == reference[0].tokens[:2], "the first greedy tokens differ"
    assert difference <= tolerance
