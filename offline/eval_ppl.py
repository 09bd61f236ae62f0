"""`moesvd eval-ppl`: held-out perplexity of dense and compressed checkpoints, in PyTorch (no vLLM).

    moesvd eval-ppl DENSE_DIR COMPRESSED_DIR ... --data test.txt [--seq-len 128] [--max-tokens N]
                    [--dtype float32] [--json OUT.json]

Every checkpoint is loaded with `offline.reference.load_reference_model` (dense, shared_basis or
per_expert). The text file is tokenized once as a single stream (no special tokens), cut to `max_tokens`
tokens, and split into non-overlapping windows of `seq_len` tokens; a tail shorter than a window is
dropped. By default a window's first token is context only and the other `seq_len - 1` are scored (the
convention of the MoE-SVD / SVD-LLM WikiText evaluation and of `offline.bundled.evaluate`); with
`--add-bos` the tokenizer's BOS token is prepended to every window and all `seq_len` tokens are scored.
`tokens` is the exact number of scored tokens, `nll` the mean negative log-likelihood per scored token
(nats), `ppl = exp(nll)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from moesvd_vllm.format.schema import read_moe_svd_config
from moesvd_vllm.format.safetensors_io import torch_dtype
from offline.reference import load_reference_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored tokens


@dataclass(frozen=True)
class EvalWindows:
    """Model inputs [n, L]; every token after a window's first (text token or BOS) is a scored target."""

    input_ids: torch.Tensor

    @property
    def scored_tokens(self) -> int:
        return self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {model_dir} ({error}); copy the original model's "
                         "tokenizer files there or pass tokenizer_dir / --tokenizer") from None


def _bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos: the tokenizer defines no BOS token; evaluate without it")
    return tokenizer.bos_token_id


def make_windows(token_ids: list[int], *, seq_len: int, max_tokens: int | None,
                 bos_token_id: int | None) -> EvalWindows:
    """Non-overlapping windows of `seq_len` text tokens (see the module docstring for BOS handling)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream = torch.tensor(token_ids[:max_tokens] if max_tokens is not None else token_ids, dtype=torch.long)
    count = stream.numel() // seq_len
    if count == 0:
        raise ValueError(f"the text has {stream.numel()} tokens (after --max-tokens), fewer than one window "
                         f"of {seq_len}; use more text or a smaller --seq-len")
    windows = stream[: count * seq_len].view(count, seq_len)
    if bos_token_id is None:
        return EvalWindows(windows)
    bos = torch.full((count, 1), bos_token_id, dtype=torch.long)
    return EvalWindows(torch.cat([bos, windows], dim=1))


@torch.no_grad()
def summed_nll(model: torch.nn.Module, windows: EvalWindows, batch_size: int = 8) -> float:
    """Summed negative log-likelihood (nats, float64) of the scored tokens of all windows: every token
    after a window's first, predicted from the logits at the position before it. The one perplexity
    implementation (`offline.bundled.evaluate` calls it too)."""
    total = 0.0
    batches = range(0, windows.input_ids.shape[0], batch_size)
    for start in tqdm(batches, desc="windows", disable=len(batches) < 4, leave=False):
        batch = windows.input_ids[start:start + batch_size]
        logits = model(input_ids=batch).logits.double()
        predictions, targets = logits[:, :-1], batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(nll)
    return total


def evaluate_perplexity(model_dir: str | os.PathLike, text: str, *, seq_len: int = 128,
                        max_tokens: int | None = None, dtype: torch.dtype | str = torch.float32,
                        tokenizer_dir: str | os.PathLike | None = None, add_bos: bool = False,
                        batch_size: int = 8, skip_beta: str | None = None) -> PerplexityResult:
    """Perplexity of the checkpoint in `model_dir` on `text` (any form the reference loader reads)."""
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    token_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos_token_id = _bos_token_id(tokenizer) if add_bos else None
    windows = make_windows(token_ids, seq_len=seq_len, max_tokens=max_tokens, bos_token_id=bos_token_id)
    model = load_reference_model(model_dir, dtype=torch_dtype(dtype), skip_beta=skip_beta)
    total = summed_nll(model, windows, batch_size=batch_size)
    tokens = windows.scored_tokens
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="dense or compressed checkpoint directories")
    parser.add_argument("--data", required=True, help="UTF-8 text file (held-out text)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use only the first N tokens of the text (default: all)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--add-bos", action="store_true",
                        help="prepend the tokenizer's BOS token to every window and score all its tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: each MODEL_DIR's own tokenizer)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--skip-beta", default=None,
                        help="dynamic expert skipping: replace the checkpoint's betas (a number in [0, 1] for "
                             "every MoE layer, 'off', or JSON {layer: beta}; the server's MOESVD_SKIP_BETA)")


def _method_of(model_dir: str) -> str:
    block = read_moe_svd_config(model_dir)
    return "dense" if block is None else block.method


def _table(rows: list[dict]) -> str:
    header = f"{'model':<40} {'method':<16} {'tokens':>8} {'nll':>9} {'ppl':>11} {'vs first':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row["ppl"] / rows[0]["ppl"]
        lines.append(f"{Path(row['model']).name[-40:]:<40} {row['method']:<16} {row['tokens']:>8d} "
                     f"{row['nll']:>9.5f} {row['ppl']:>11.4f} {ratio:>8.3f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    text = Path(args.data).read_text(encoding="utf-8")
    rows = []
    for model_dir in args.model_dirs:
        started = time.perf_counter()
        result = evaluate_perplexity(model_dir, text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                     dtype=args.dtype, tokenizer_dir=args.tokenizer,
                                     add_bos=args.add_bos, batch_size=args.batch_size,
                                     skip_beta=args.skip_beta)
        seconds = time.perf_counter() - started
        logger.info("%s: ppl %.4f over %d tokens (%.1f s)", model_dir, result.ppl, result.tokens, seconds)
        rows.append({"model": str(model_dir), "method": _method_of(model_dir), **asdict(result),
                     "seconds": round(seconds, 2)})
    if len({row["tokens"] for row in rows}) > 1:
        logger.warning("the checkpoints scored different token counts (different tokenizers?): "
                       "their perplexities are not comparable")
    if args.json:
        payload = {"data": str(args.data), "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                   "dtype": args.dtype, "add_bos": args.add_bos, "results": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(_table(rows))
    return 0
