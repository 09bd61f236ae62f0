"""Distillation data for `moesvd recover`: token windows, and the guard that keeps held-out text out.

The data is read like calibration data (`offline.calibration`: a .txt/.jsonl file or a directory of them),
tokenized with the teacher's tokenizer into one stream, and cut into seeded random windows of `seq_len`
tokens: `num_samples` training windows, then `eval_samples` windows of their own for the before/after
measurements (drawn from the same stream with another seed; they may overlap the training windows, they
are a fixed probe, not a test set).

Held-out text (the bundled model's test split always, plus any `--held-out` file) must never be trained
on. A file whose bytes equal a held-out file is refused by its SHA-256; any other data is refused when a
held-out passage is in it: the held-out text is cut into chunks of `CHUNK_WORDS` words, and a chunk is
"contained" when at least `CONTAINED_FRACTION` of its `NGRAM`-word n-grams (lower-cased, whitespace
split) occur in the data. Measured on the bundled corpus (docs/results.md, Recovery): the train split
shares at most 31 % of one test chunk's 13-grams (formulaic verses recur across books) and 0.8 % of all
test 13-grams; a test chapter pasted into the data shares 100 %.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moesvd_vllm.errors import MoESVDError
from offline.calibration_data import read_calibration_texts, tokenize_corpus

logger = logging.getLogger(__name__)

NGRAM = 13  # words per n-gram (the usual contamination-check length)
CHUNK_WORDS = 256  # held-out text is checked in chunks of this many words
CONTAINED_FRACTION = 0.5  # a chunk with at least this share of its n-grams in the data is contained
EVAL_SEED_OFFSET = 1_000_003  # the eval windows' seed: seed + this (disjoint from the training draw)


class RecoveryDataError(MoESVDError):
    """The distillation data is unusable: unreadable, too short, or overlapping held-out text."""


def bundled_test_split() -> Path:
    from offline.bundled import corpus_split_path

    return corpus_split_path("test")


# ------------------------------------------------------------------------------------------ overlap guard
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    return [source] if source.is_file() else []


def _ngrams(words: list[str]) -> list[str]:
    return [" ".join(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


@dataclass(frozen=True)
class Overlap:
    held_out: Path
    chunk: int  # index of the first contained chunk
    words: int  # first word of that chunk in the held-out file
    fraction: float  # share of its n-grams found in the data
    contained_chunks: int
    total_chunks: int


def find_overlap(data_texts: list[str], held_out: Path) -> Overlap | None:
    """The first chunk of `held_out` contained in the data (see the module docstring), or None."""
    words = held_out.read_text(encoding="utf-8").lower().split()
    chunks = [words[s:s + CHUNK_WORDS] for s in range(0, len(words), CHUNK_WORDS)]
    chunk_grams = [set(_ngrams(c)) for c in chunks]
    wanted = set().union(*chunk_grams) if chunk_grams else set()
    found: set[str] = set()
    for text in data_texts:
        found.update(g for g in _ngrams(text.lower().split()) if g in wanted)
    contained = [(i, len(g & found) / len(g)) for i, g in enumerate(chunk_grams)
                 if g and len(g & found) / len(g) >= CONTAINED_FRACTION]
    if not contained:
        return None
    first, fraction = contained[0]
    return Overlap(held_out, first, first * CHUNK_WORDS, fraction, len(contained), len(chunks))


def check_no_held_out_text(source: str | os.PathLike, data_texts: list[str],
                           held_out: tuple[Path, ...]) -> None:
    """Refuse distillation data that is, or contains, held-out text (raises RecoveryDataError)."""
    files = _data_files(Path(source))
    for path in held_out:
        digest = _file_sha256(path)
        for data_file in files:
            if _file_sha256(data_file) == digest:
                raise RecoveryDataError(
                    f"distillation data {data_file} is the held-out file {path} (same SHA-256 {digest[:12]}): "
                    "training on it would make its perplexity meaningless; distil on the train split "
                    "(offline/bundled/kjv_text/train.txt for the bundled model). Nothing was written.")
        overlap = find_overlap(data_texts, path)
        if overlap is not None:
            raise RecoveryDataError(
                f"distillation data {source} contains held-out text of {path}: {overlap.contained_chunks} of "
                f"its {overlap.total_chunks} chunks of {CHUNK_WORDS} words, the first at word {overlap.words} "
                f"({overlap.fraction:.0%} of its {NGRAM}-word n-grams found); remove that text from the data "
                "(the held-out split must stay unseen). Nothing was written.")


# ------------------------------------------------------------------------------------------ windows
@dataclass
class DistillationData:
    train: torch.Tensor  # [num_samples, seq_len] int64
    eval: torch.Tensor  # [eval_samples, seq_len] int64
    source: str
    sha256: str  # of the training windows' token ids
    stream_tokens: int


def _windows(tokens: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]) if count else \
        torch.zeros(0, seq_len, dtype=torch.int64)


def load_distillation_data(source: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, num_samples: int,
                           eval_samples: int, seq_len: int, batch_size: int, seed: int,
                           held_out: tuple[Path, ...]) -> DistillationData:
    """Read, check (held-out overlap, length) and window the distillation data."""
    from transformers import AutoTokenizer

    if not Path(source).exists():
        raise RecoveryDataError(f"distillation data {source} does not exist; pass a .txt/.jsonl file or a "
                                "directory of them (never the test split)")
    try:
        texts = read_calibration_texts(source)
    except ValueError as error:
        raise RecoveryDataError(f"distillation data {source}: {error}") from None
    check_no_held_out_text(source, texts, held_out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = tokenize_corpus(texts, tokenizer)
    needed = batch_size * seq_len
    if tokens.numel() < needed:
        raise RecoveryDataError(
            f"distillation data {source} has {tokens.numel()} tokens, shorter than one batch of {batch_size} "
            f"x {seq_len} = {needed} tokens; give more text or a smaller --batch-size / --seq-len. "
            "Nothing was written.")
    if tokens.numel() < num_samples * seq_len:
        logger.warning("distillation data has %d tokens for %d windows of %d: windows overlap", tokens.numel(),
                       num_samples, seq_len)
    train = _windows(tokens, num_samples, seq_len, seed)
    probe = _windows(tokens, eval_samples, seq_len, seed + EVAL_SEED_OFFSET)
    sha = hashlib.sha256(train.contiguous().numpy().tobytes()).hexdigest()
    logger.info("distillation data: %d x %d training tokens (+ %d probe windows) from %s (%d tokens, sha256 %s)",
                num_samples, seq_len, eval_samples, source, tokens.numel(), sha[:12])
    return DistillationData(train, probe, str(source), sha, tokens.numel())
