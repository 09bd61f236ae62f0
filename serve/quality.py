"""Output quality of arm B against arm A from the servers' own log-probabilities.

One request per prompt and arm: `/v1/completions` with `echo: true, logprobs: k, temperature: 0,
max_tokens: N`. The answer holds the prompt's tokens with the log-probability the model gave each one
given the tokens before it (teacher forcing on held-out text), the k most likely alternatives at every
position, and a greedy continuation of N tokens.

Per-token records come from vLLM's `prompt_logprobs` (keyed by token id, with each token's decoded text)
when the server sends it, else from the OpenAI `logprobs.top_logprobs` dicts (keyed by token text).
Alternatives are compared between arms by their decoded text; ids that decode to the same text at one
position are merged (probabilities added). The first prompt token has no log-probability and is skipped.

Metrics (positions pooled over all prompts; a prompt that failed on either arm is left out and listed):
  perplexity_a / perplexity_b  exp(mean NLL of the prompt tokens)
  mean_delta_nll               mean over positions of NLL_B - NLL_A (nats/token; > 0: B is worse)
  top1_agreement               % of positions where the most likely token (rank 1) is the same
  kl_a_b_topk_lower_bound      mean over positions of KL(A || B) on the coarsened distribution
                               {tokens returned by BOTH arms} + {one "rest" bucket}; each arm's rest mass
                               is 1 - (its probability on the shared tokens), exact because the returned
                               log-probabilities are from the full softmax. Merging outcomes never raises
                               KL (data-processing inequality), so this is a LOWER BOUND of the full-
                               vocabulary KL. A rest mass below 1e-10 is floored at 1e-10.
  exact_match_rate             % of prompts whose greedy continuations are the same text
The token-level metrics need both arms to cut each text into the same tokens. If any prompt's token
texts differ between the arms, they are refused (None) with the first difference named; per-arm
perplexities are then kept but marked not comparable (different tokens), and exact match, a text-level
metric, is still reported.
"""

from __future__ import annotations

import logging
import math
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from serve.endpoints import Endpoint, describe_unreachable
from serve.http import HTTPError, post_json
from serve.prompts import Prompt

logger = logging.getLogger(__name__)

REST_MASS_FLOOR = 1e-10


@dataclass(frozen=True)
class QualitySettings:
    top_logprobs: int = 20  # vLLM's default --max-logprobs is 20
    max_tokens: int = 16  # greedy continuation length for exact match
    parallel_requests: int = 2
    request_timeout_s: float = 300.0


@dataclass
class PromptScores:
    """What one arm said about one prompt."""

    prompt_index: int
    error: str = ""
    tokens: list[str] = field(default_factory=list)  # prompt token texts
    logprobs: list[float | None] = field(default_factory=list)  # per prompt token; None for the first
    alternatives: list[dict[str, float] | None] = field(default_factory=list)  # text -> logprob
    top1: list[str | None] = field(default_factory=list)
    continuation: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = ""  # "prompt_logprobs" (vLLM, by id) or "top_logprobs" (OpenAI, by text)

    @property
    def ok(self) -> bool:
        return not self.error


def _logsumexp_pair(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def _from_vllm_prompt_logprobs(entries: list) -> tuple[list, list]:
    """vLLM's per-position {token id: {logprob, rank, decoded_token}} -> (alternatives by text, top-1)."""
    alternatives, top1 = [], []
    for entry in entries:
        if not entry:
            alternatives.append(None)
            top1.append(None)
            continue
        merged: dict[str, float] = {}
        best_text, best_rank = None, math.inf
        for info in entry.values():
            text, value = info.get("decoded_token") or "", float(info["logprob"])
            merged[text] = _logsumexp_pair(merged[text], value) if text in merged else value
            if info.get("rank", math.inf) < best_rank:
                best_text, best_rank = text, info["rank"]
        alternatives.append(merged)
        top1.append(best_text if best_rank == 1 else max(merged, key=merged.get))
    return alternatives, top1


def parse_echo_answer(index: int, prompt: Prompt, answer: dict) -> PromptScores:
    """Turn one echo+logprobs completion answer into PromptScores (error set if it lacks a part)."""
    scores = PromptScores(prompt_index=index)
    try:
        choice = answer["choices"][0]
        logprobs = choice["logprobs"]
        usage = answer.get("usage") or {}
        n_prompt = int(usage.get("prompt_tokens") or 0)
        tokens, token_lps, tops = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        scores.error = f"answer lacks echo logprobs ({type(err).__name__}: {err}); does the server " \
                       "support echo with logprobs on /v1/completions?"
        return scores
    if not n_prompt:
        vllm_entries = choice.get("prompt_logprobs")
        n_prompt = len(vllm_entries) if vllm_entries else 0
    if not n_prompt or n_prompt > min(len(tokens), len(token_lps), len(tops)):
        scores.error = (f"cannot tell prompt tokens from generated ones (usage.prompt_tokens={n_prompt}; "
                        f"returned {len(tokens)} tokens, {len(token_lps)} token_logprobs, {len(tops)} "
                        "top_logprobs)")
        return scores
    scores.prompt_tokens, scores.completion_tokens = n_prompt, int(usage.get("completion_tokens") or 0)
    scores.tokens = list(tokens[:n_prompt])
    scores.logprobs = [None if v is None else float(v) for v in token_lps[:n_prompt]]
    vllm_entries = choice.get("prompt_logprobs")
    if isinstance(vllm_entries, list) and len(vllm_entries) == n_prompt:
        scores.alternatives, scores.top1 = _from_vllm_prompt_logprobs(vllm_entries)
        scores.source = "prompt_logprobs"
    else:
        scores.alternatives = [dict(t) if t else None for t in tops[:n_prompt]]
        scores.top1 = [max(t, key=t.get) if t else None for t in scores.alternatives]
        scores.source = "top_logprobs"
    text = choice.get("text") or ""
    scores.continuation = text[len(prompt.text):] if text.startswith(prompt.text) else "".join(tokens[n_prompt:])
    return scores


def score_prompt(endpoint: Endpoint, index: int, prompt: Prompt, settings: QualitySettings) -> PromptScores:
    payload = {"model": endpoint.model, "prompt": prompt.text, "echo": True,
               "logprobs": settings.top_logprobs, "max_tokens": settings.max_tokens, "temperature": 0.0}
    url = endpoint.url("/v1/completions")
    try:
        answer = post_json(url, payload, timeout=settings.request_timeout_s)
    except HTTPError as err:
        return PromptScores(prompt_index=index, error=f"HTTP {err.status}: {err.body[:300]}")
    except (urllib.error.URLError, OSError) as err:
        return PromptScores(prompt_index=index, error=describe_unreachable(url, err))
    except ValueError as err:  # not JSON
        return PromptScores(prompt_index=index, error=f"answer is not JSON: {err}")
    try:
        return parse_echo_answer(index, prompt, answer)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        return PromptScores(prompt_index=index, error=f"malformed echo/logprobs answer from {url} "
                                                      f"({type(err).__name__}: {err})")


def score_prompts(endpoint: Endpoint, prompts: list[Prompt], settings: QualitySettings,
                  show_progress: bool = True) -> list[PromptScores]:
    with ThreadPoolExecutor(max_workers=settings.parallel_requests) as pool, \
            tqdm(total=len(prompts), desc=f"quality arm {endpoint.label}", leave=False,
                 disable=not show_progress) as progress:
        futures = [pool.submit(score_prompt, endpoint, i, p, settings) for i, p in enumerate(prompts)]
        results = []
        for future in futures:
            results.append(future.result())
            progress.update(1)
    failed = [s for s in results if not s.ok]
    if failed:
        logger.warning("quality arm %s: %d of %d prompts failed; first error: %s", endpoint.label,
                       len(failed), len(results), failed[0].error)
    return results


def kl_topk_lower_bound(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """(KL(A||B) on shared tokens + one rest bucket, A's probability mass on the shared tokens)."""
    shared = set(a) & set(b)
    kl, mass_a, mass_b = 0.0, 0.0, 0.0
    for token in shared:
        p, q = math.exp(a[token]), math.exp(b[token])
        kl += p * (a[token] - b[token])
        mass_a, mass_b = mass_a + p, mass_b + q
    rest_a = max(1.0 - mass_a, REST_MASS_FLOOR)
    rest_b = max(1.0 - mass_b, REST_MASS_FLOOR)
    kl += rest_a * math.log(rest_a / rest_b)
    return max(kl, 0.0), mass_a


def first_token_difference(a: PromptScores, b: PromptScores) -> str | None:
    if a.tokens == b.tokens:
        return None
    for position, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        if ta != tb:
            return f"prompt {a.prompt_index} token {position}: A {ta!r} vs B {tb!r}"
    return f"prompt {a.prompt_index}: A has {len(a.tokens)} tokens, B has {len(b.tokens)}"


def _perplexity(nll_sum: float, count: int) -> float | None:
    return math.exp(nll_sum / count) if count else None


def compare_quality(prompts: list[Prompt], scores_a: list[PromptScores],
                    scores_b: list[PromptScores]) -> dict:
    """The quality section of the A/B report (see the module docstring for every definition)."""
    pairs = [(a, b) for a, b in zip(scores_a, scores_b) if a.ok and b.ok]
    failed = [{"prompt_index": a.prompt_index, "id": prompts[a.prompt_index].id,
               "error_a": a.error or None, "error_b": b.error or None}
              for a, b in zip(scores_a, scores_b) if not (a.ok and b.ok)]
    differences = [d for d in (first_token_difference(a, b) for a, b in pairs) if d]
    same_tokens = not differences
    nll_a = nll_b = delta = kl = shared_mass = 0.0
    count_a = count_b = positions = agree = 0
    for a, b in pairs:
        for lp in a.logprobs[1:]:
            if lp is not None:
                nll_a, count_a = nll_a - lp, count_a + 1
        for lp in b.logprobs[1:]:
            if lp is not None:
                nll_b, count_b = nll_b - lp, count_b + 1
        if not same_tokens:
            continue
        for pos in range(1, len(a.tokens)):
            lpa, lpb = a.logprobs[pos], b.logprobs[pos]
            alt_a, alt_b = a.alternatives[pos], b.alternatives[pos]
            if lpa is None or lpb is None or not alt_a or not alt_b:
                continue
            positions += 1
            delta += lpa - lpb
            agree += a.top1[pos] == b.top1[pos]
            position_kl, mass = kl_topk_lower_bound(alt_a, alt_b)
            kl, shared_mass = kl + position_kl, shared_mass + mass
    exact = sum(a.continuation == b.continuation for a, b in pairs)
    section = {
        "prompts_scored": len(pairs),
        "prompts_failed": failed,
        "same_tokenization": same_tokens,
        "tokenization_differences": differences[:5],
        "logprob_sources": sorted({s.source for pair in pairs for s in pair}),
        "tokens_scored_a": count_a,
        "tokens_scored_b": count_b,
        "perplexity_a": _perplexity(nll_a, count_a),
        "perplexity_b": _perplexity(nll_b, count_b),
        "perplexity_ratio": None,
        "positions_compared": positions,
        "mean_delta_nll": delta / positions if positions else None,
        "top1_agreement": 100.0 * agree / positions if positions else None,
        "kl_a_b_topk_lower_bound": kl / positions if positions else None,
        "mean_shared_topk_mass_a": shared_mass / positions if positions else None,
        "exact_match_rate": 100.0 * exact / len(pairs) if pairs else None,
        "exact_matches": exact,
        "refused": None,
    }
    if same_tokens and section["perplexity_a"] and section["perplexity_b"]:
        section["perplexity_ratio"] = section["perplexity_b"] / section["perplexity_a"]
    if not same_tokens:
        section["refused"] = (
            "the two arms tokenize the prompts differently (first difference: " + differences[0] +
            "); token-level comparisons (delta NLL, top-1 agreement, KL, perplexity ratio) are refused. "
            "Compare models that share a tokenizer, or compare per-arm perplexities only as different "
            "units.")
        logger.warning("quality: %s", section["refused"])
    return section
