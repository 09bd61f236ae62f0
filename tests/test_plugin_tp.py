"""Tensor parallelism, run: compressed checkpoints served with --tensor-parallel-size 2 equal TP=1.

vLLM's CPU build runs two workers on this 2-core machine when their OpenMP threads are bound by hand
(`VLLM_CPU_OMP_THREADS_BIND="0|1"`; without it vLLM refuses: one NUMA node). Under TP the shared bases
and the router are replicated, every bank's kept neurons are split over the ranks, and vLLM sums the
ranks' partial outputs. Two `moesvd compress` checkpoints cover the three layer kinds:

* qwen3_moe, `banks` recipe: low-rank layers with shared bases (rank 32 < H) AND U-trimming banks;
* mixtral, `neurons` recipe: kept neurons only (no bases; 80-88 kept neurons, split 40-44 per rank).

Same greedy tokens, and prompt / generated logprobs within float32 noise: TP changes the order of the
float32 sums (attention heads, the split intermediate reduction, the all-reduce), so the bound is a
few units of float32 eps times the logits' accumulation: the model's measured float32 noise times
SAFETY (tests/support/plugin.float32_tolerance), as for the exactness tests.
`--enable-expert-parallel` (slow): the plugin splits every bank's neurons over the EP group the same way;
on CPU vLLM's own fused-MoE kernel cannot run expert-parallel dense MoE layers (no expert map: the worker
crashes), so a checkpoint that leaves MoE layers dense is refused with EP on CPU.
"""

from __future__ import annotations

import logging

import pytest

from moesvd_vllm.format.schema import read_moe_svd_config
from tests.support.plugin import TP2, float32_tolerance, max_logprob_difference, same_greedy_tokens

logger = logging.getLogger(__name__)

CHECKPOINTS = [("qwen3_moe", "banks"), pytest.param("mixtral", "neurons", marks=pytest.mark.slow)]


def _compare(compressed_checkpoint, served_scores, arch, recipe, parallel: dict) -> float:
    model_dir = compressed_checkpoint(arch, recipe)
    single = served_scores(model_dir)
    parallel_run = served_scores(model_dir, **parallel)
    difference = max_logprob_difference(parallel_run.scores, single.scores)
    logger.info("%s %s: %s vs TP=1: max |logprob diff| %.2e (ready in %.0f s vs %.0f s)", arch, recipe,
                parallel["extra_args"], difference, parallel_run.startup_seconds, single.startup_seconds)
    assert same_greedy_tokens(parallel_run.scores, single.scores)
    assert difference <= float32_tolerance(model_dir, single.scores)
    return difference


@pytest.mark.parametrize("arch, recipe", CHECKPOINTS)
def test_tensor_parallel_2_equals_tensor_parallel_1(compressed_checkpoint, served_scores, arch, recipe):
    config = read_moe_svd_config(compressed_checkpoint(arch, recipe))
    if recipe == "banks":
        assert all(spec.bases and spec.rank < 128 and spec.num_banks < spec.num_experts
                   for spec in config.layers.values())
    else:
        assert all(not spec.bases for spec in config.layers.values())
    _compare(compressed_checkpoint, served_scores, arch, recipe, TP2)


EXPERT_PARALLEL = dict(TP2, extra_args=TP2["extra_args"] + ["--enable-expert-parallel"])


@pytest.mark.slow
def test_expert_parallel_2_equals_tensor_parallel_1(compressed_checkpoint, served_scores):
    """Every MoE layer decomposed (mixtral `neurons`): the banks' neurons split over the EP group."""
    model_dir = compressed_checkpoint("mixtral", "neurons")
    assert len(read_moe_svd_config(model_dir).layers) == 4  # all MoE layers of the tiny Mixtral
    _compare(compressed_checkpoint, served_scores, "mixtral", "neurons", EXPERT_PARALLEL)


@pytest.mark.slow
def test_expert_parallel_with_dense_moe_layers_is_refused_on_cpu(compressed_checkpoint):
    """vLLM 0.32's CPU kernel crashes (SIGSEGV) on expert-parallel dense MoE layers: refused at startup."""
    import torch

    from serve.launch import ServerStartError, VLLMServer
    from tests.support.plugin import serve_options

    if torch.cuda.is_available():
        pytest.skip("a CPU-kernel limitation; on GPUs vLLM places the dense layers' experts itself")
    model_dir = compressed_checkpoint("qwen3_moe", "banks")
    dense = sorted(set(range(4)) - set(read_moe_svd_config(model_dir).decomposed_layers))
    assert dense, "the banks recipe leaves some of the 4 MoE layers dense"
    server = VLLMServer(serve_options(model_dir, **EXPERT_PARALLEL))
    with pytest.raises(ServerStartError):
        server.start()
    log = server.log_path.read_text(errors="replace")
    assert "--enable-expert-parallel on CPU" in log and f"MoE layer(s) {dense}" in log, log[-3000:]
