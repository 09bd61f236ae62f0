"""Send streaming completion requests to one OpenAI-compatible server and time them.

Timing follows `vllm bench serve` (vllm/benchmarks/lib/endpoint_request_func.py, completions API):
  - the clock starts just before the request is sent;
  - TTFT is the arrival of the first SSE chunk that carries `choices` (its text may be empty);
  - every later `choices` chunk adds one ITL value (time since the previous such chunk);
  - the end-to-end latency runs to the last `choices` chunk;
  - output tokens are the server's own count (`usage.completion_tokens`, asked for with
    `stream_options.include_usage`). A server that sends no usage gets its `choices` chunks counted
    instead, and the request is marked `output_tokens_counted_from_chunks`.
A request "fails" when the answer is not HTTP 200, carries no `choices` chunk, or the connection breaks;
its error text is kept. Nothing here raises on a bad answer.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import random
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm

from serve.endpoints import Endpoint
from serve.prompts import Prompt

logger = logging.getLogger(__name__)

ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class GenerationSettings:
    """What every speed request asks for (the same for both arms)."""

    max_tokens: int = 64
    ignore_eos: bool = True  # vLLM extension: every request generates max_tokens (equal work per arm)
    temperature: float = 0.0
    request_timeout_s: float = 600.0

    def payload(self, model: str, prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


@dataclass
class RequestResult:
    """One timed request (times in seconds)."""

    prompt_index: int
    success: bool = False
    error: str = ""
    http_status: int | None = None
    start_time: float = 0.0  # perf_counter at send
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_tokens_counted_from_chunks: bool = False
    generated_text: str = ""


@dataclass
class LoadRun:
    """All requests of one load level against one arm."""

    arm: str
    max_concurrency: int | None
    request_rate: float  # requests/s; inf = all at once (bounded by max_concurrency)
    duration_s: float
    results: list[RequestResult]


def pool_runs(runs: list[LoadRun]) -> LoadRun:
    """Several runs of one arm at one level as one: all requests, durations summed."""
    if not runs:
        raise ValueError("nothing to pool")
    first = runs[0]
    return LoadRun(arm=first.arm, max_concurrency=first.max_concurrency, request_rate=first.request_rate,
                   duration_s=sum(r.duration_s for r in runs),
                   results=[result for run in runs for result in run.results])


class _SSEReader:
    """Splits a byte stream into `data:` messages (chunks may cut messages anywhere)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character

    def feed(self, data: bytes) -> list[str]:
        self.buffer += self.decoder.decode(data).replace("\r\n", "\n")
        messages = []
        while "\n\n" in self.buffer:
            block, self.buffer = self.buffer.split("\n\n", 1)
            for line in block.splitlines():
                if line.startswith("data:"):
                    messages.append(line[len("data:"):].strip())
        return messages


async def _consume_stream(response: aiohttp.ClientResponse, result: RequestResult) -> None:
    reader = _SSEReader()
    chunks_with_choices = 0
    last = result.start_time
    usage_tokens: int | None = None
    async for data in response.content.iter_any():
        for message in reader.feed(data):
            if not message or message == "[DONE]":
                continue
            try:
                event = json.loads(message)
            except json.JSONDecodeError:
                result.error = f"unparseable stream message: {message[:ERROR_BODY_CHARS]!r}"
                continue
            if event.get("choices"):
                now = time.perf_counter()
                if chunks_with_choices == 0:
                    result.ttft = now - result.start_time
                else:
                    result.itl.append(now - last)
                last = now
                chunks_with_choices += 1
                result.generated_text += event["choices"][0].get("text") or ""
            usage = event.get("usage")
            if isinstance(usage, dict):
                usage_tokens = usage.get("completion_tokens", usage_tokens)
                result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
            if isinstance(event.get("error"), dict):
                result.error = f"error in stream: {str(event['error'])[:ERROR_BODY_CHARS]}"
    result.latency = last - result.start_time
    if chunks_with_choices == 0:
        result.error = result.error or "the stream carried no token (no 'choices' chunk)"
        return
    if usage_tokens is None:
        result.output_tokens = chunks_with_choices
        result.output_tokens_counted_from_chunks = True
    else:
        result.output_tokens = int(usage_tokens)
    result.success = not result.error.startswith("error in stream")  # a bad message alone is tolerated


async def _send_one(session: aiohttp.ClientSession, endpoint: Endpoint, prompt: Prompt, index: int,
                    settings: GenerationSettings) -> RequestResult:
    result = RequestResult(prompt_index=index)
    result.start_time = time.perf_counter()
    try:
        async with session.post(endpoint.url("/v1/completions"),
                                json=settings.payload(endpoint.model, prompt.text)) as response:
            result.http_status = response.status
            if response.status != 200:
                body = (await response.text(errors="replace"))[:ERROR_BODY_CHARS]
                result.error = f"HTTP {response.status}: {body}"
                return result
            await _consume_stream(response, result)
    except asyncio.TimeoutError:
        result.error = f"timed out after {settings.request_timeout_s:.0f} s"
    except (aiohttp.ClientError, OSError) as err:
        result.error = f"{type(err).__name__}: {err}"
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
        result.success = False
        result.error = f"malformed streaming answer ({type(err).__name__}: {err})"
    return result


def _arrival_delays(count: int, request_rate: float, seed: int) -> list[float]:
    """Poisson arrivals (exponential gaps) at `request_rate`/s; all zero when the rate is infinite."""
    if request_rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.expovariate(request_rate) for _ in range(count)]


async def _run_load(endpoint: Endpoint, prompts: list[Prompt], settings: GenerationSettings,
                    max_concurrency: int | None, request_rate: float, seed: int,
                    progress: tqdm | None) -> LoadRun:
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)

    async def limited(index: int, prompt: Prompt) -> RequestResult:
        if limit is None:
            result = await _send_one(session, endpoint, prompt, index, settings)
        else:
            async with limit:
                result = await _send_one(session, endpoint, prompt, index, settings)
        if progress is not None:
            progress.update(1)
        return result

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        started = time.perf_counter()
        for index, (prompt, delay) in enumerate(
                zip(prompts, _arrival_delays(len(prompts), request_rate, seed))):
            tasks.append(asyncio.create_task(limited(index, prompt)))
            if delay:
                await asyncio.sleep(delay)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return LoadRun(arm=endpoint.label, max_concurrency=max_concurrency, request_rate=request_rate,
                   duration_s=duration, results=list(results))


def run_load(endpoint: Endpoint, prompts: list[Prompt], settings: GenerationSettings, *,
             max_concurrency: int | None, request_rate: float = float("inf"), seed: int = 0,
             show_progress: bool = True) -> LoadRun:
    """Send every prompt once to `endpoint` (bounded by max_concurrency, paced by request_rate)."""
    level = f"c={max_concurrency}" if max_concurrency else f"rate={request_rate:g}/s"
    with tqdm(total=len(prompts), desc=f"arm {endpoint.label} {level}", leave=False,
              disable=not show_progress) as progress:
        run = asyncio.run(_run_load(endpoint, prompts, settings, max_concurrency, request_rate, seed,
                                    progress))
    failed = [r for r in run.results if not r.success]
    if failed:
        logger.warning("arm %s %s: %d of %d requests failed; first error: %s", endpoint.label, level,
                       len(failed), len(run.results), failed[0].error)
    return run
