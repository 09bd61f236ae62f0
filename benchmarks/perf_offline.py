"""Offline (in-process `vllm.LLM`) measurements: output tokens/s at several batch sizes, MoE-block time
inside the worker, resident expert weights and a profile of the block.

Two engines are alive at once, the dense one and one compressed one, and every measurement is taken on
both in alternating order (D C, C D, ...), so load from other processes on a shared machine hits both
alike. The dense engine stays up while compressed engines are swapped in and out.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import perf_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineOptions:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    block_tokens: tuple[int, ...] = (1, 32, 512)
    input_len: int = 64
    output_len: int = 64
    repeats: int = 2  # alternating rounds (D C, C D, ...)
    block_repeats: int = 5  # timed calls per block measurement (the median is reported)
    profile_tokens: tuple[int, ...] = (32, 512)
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    enforce_eager: bool = False
    seed: int = 0


@dataclass
class EngineResult:
    """Everything measured on one engine (lists: one entry per alternating round)."""

    model_dir: str
    load_seconds: float
    throughput: dict[int, list[float]] = field(default_factory=dict)  # batch -> output tok/s
    block_ms: dict[int, list[float]] = field(default_factory=dict)  # tokens -> median ms per round
    weights: dict = field(default_factory=dict)
    description: dict = field(default_factory=dict)
    profiles: list[dict] = field(default_factory=list)


def prepare_environment(options: OfflineOptions) -> None:
    """Environment every engine needs: worker RPC of our functions, small KV cache, no telemetry."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of perf_worker functions
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def start_engine(model_dir: Path, options: OfflineOptions):
    """An in-process vLLM engine for `model_dir` (plus its load time)."""
    from vllm import LLM

    started = time.monotonic()
    llm = LLM(model=str(model_dir), dtype=options.dtype, max_model_len=options.max_model_len,
              max_num_seqs=max(options.batch_sizes), seed=options.seed,
              max_num_batched_tokens=max(options.max_model_len, max(options.batch_sizes) * options.input_len),
              enforce_eager=options.enforce_eager)
    seconds = time.monotonic() - started
    logger.info("engine for %s ready in %.0f s", model_dir.name, seconds)
    return llm, seconds


def stop_engine(llm) -> None:
    """Shut the engine's core process down and free its memory before the next one starts."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as error:  # noqa: BLE001 - best effort: the process exits anyway at the end
        logger.warning("engine shutdown: %s", error)
    del llm
    gc.collect()


def _prompts(batch: int, options: OfflineOptions, vocab_size: int) -> list[dict]:
    """`batch` deterministic random token-id prompts of input_len tokens (distinct per prompt)."""
    import torch

    generator = torch.Generator().manual_seed(options.seed + batch)
    ids = torch.randint(10, max(11, min(vocab_size, 32000)), (batch, options.input_len), generator=generator)
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def output_throughput(llm, batch: int, options: OfflineOptions) -> float:
    """Output tokens per second of one `generate` call with `batch` prompts (prefill included)."""
    from vllm import SamplingParams

    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=options.output_len, min_tokens=options.output_len, ignore_eos=True,
                            temperature=0.0)
    prompts = _prompts(batch, options, vocab)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / seconds


def warm_up(llm, options: OfflineOptions) -> None:
    """One short generation and one block call of each size (first calls allocate and pack)."""
    from vllm import SamplingParams

    vocab = llm.llm_engine.model_config.get_vocab_size()
    llm.generate(_prompts(2, options, vocab), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.collective_rpc(perf_worker.time_moe_block, args=(list(options.block_tokens),),
                       kwargs={"repeats": 1, "warmup": 1})


def measure_round(llm, result: EngineResult, options: OfflineOptions) -> None:
    """One round on one engine: throughput at each batch size, then the block at each token count."""
    for batch in options.batch_sizes:
        tok_s = output_throughput(llm, batch, options)
        result.throughput.setdefault(batch, []).append(tok_s)
        logger.info("  %s batch %d: %.2f output tok/s", Path(result.model_dir).name, batch, tok_s)
    timings = llm.collective_rpc(perf_worker.time_moe_block, args=(list(options.block_tokens),),
                                 kwargs={"repeats": options.block_repeats})[0]
    for tokens, seconds in timings.items():
        result.block_ms.setdefault(int(tokens), []).append(statistics.median(seconds) * 1e3)
        logger.info("  %s block @%d tokens: %.1f ms", Path(result.model_dir).name, tokens,
                    statistics.median(seconds) * 1e3)


def describe(llm, result: EngineResult, options: OfflineOptions) -> None:
    result.weights = llm.collective_rpc(perf_worker.resident_weights)[0]
    result.description = llm.collective_rpc(perf_worker.block_description)[0]
    for tokens in options.profile_tokens:
        result.profiles.append(llm.collective_rpc(perf_worker.profile_moe_block, args=(tokens,))[0])


def alternate(engines: dict[str, tuple[object, EngineResult]], options: OfflineOptions) -> None:
    """`options.repeats` rounds over the engines, reversing their order every round."""
    names = list(engines)
    for round_index in range(options.repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        logger.info("round %d/%d, order %s", round_index + 1, options.repeats, " -> ".join(order))
        for name in order:
            llm, result = engines[name]
            measure_round(llm, result, options)
