"""Calibration data: a text file, a directory of .txt/.jsonl files ("text" field), or, only with network
access, a Hugging Face `datasets` name ("wikitext:wikitext-2-raw-v1:train"). The text is tokenized with the
model's tokenizer and `num_samples` windows of `seq_len` tokens are drawn with a seeded generator; the
sha256 of the token ids is recorded in `CalibrationInfo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moesvd_vllm.errors import MoESVDError
from moesvd_vllm.format.schema import CalibrationInfo

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")


class CalibrationError(MoESVDError):
    """Calibration data is missing, unreadable or too short."""


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{path}:{number}: expected a JSON object with a string 'text' field")
        texts.append(record["text"])
    return texts


def _read_dataset(name: str) -> list[str]:
    """`datasets` name "path[:config[:split]]"; needs the `datasets` package and network access."""
    try:
        import datasets  # noqa: PLC0415 (optional, heavy)
    except ImportError:
        raise CalibrationError(
            f"{name!r} is not a file or directory, and the `datasets` package is not installed to load it "
            "as a dataset name; pass a .txt/.jsonl file or a directory of them") from None
    path, config, split = (name.split(":") + [None, None])[:3]
    try:
        data = datasets.load_dataset(path, config, split=split or "train")
    except Exception as exc:  # network, unknown name, ...
        raise CalibrationError(f"could not load dataset {name!r}: {exc}; pass a local text file instead") from exc
    return [t for t in data["text"] if t.strip()]


def read_calibration_texts(source: str | os.PathLike) -> list[str]:
    """Documents of a calibration source (file, directory, or dataset name)."""
    path = Path(source)
    if path.is_file():
        texts = _read_jsonl(path) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationError(f"calibration directory {path} holds no .txt or .jsonl files")
        texts = [t for p in files for t in read_calibration_texts(p)]
    else:
        texts = _read_dataset(str(source))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {source} holds no text")
    return texts


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64, 1 = real token
    info: CalibrationInfo


def token_sha256(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    ids = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -1))
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and concatenated, separated by the EOS token when the tokenizer has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                   source: str) -> CalibrationSet:
    """`num_samples` random windows of `seq_len` tokens (seeded) from one token stream."""
    if num_samples <= 0 or seq_len <= 0:
        raise CalibrationError(f"num_samples and seq_len must be positive, got {num_samples} x {seq_len}")
    if tokens.numel() < seq_len:
        raise CalibrationError(
            f"calibration text {source} has {tokens.numel()} tokens, shorter than one sample of "
            f"{seq_len} tokens; give more text or a smaller --seq-len")
    if tokens.numel() < num_samples * seq_len:
        logger.warning("calibration text has %d tokens for %d x %d samples: windows will overlap",
                       tokens.numel(), num_samples, seq_len)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (num_samples,), generator=generator)
    input_ids = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
    attention_mask = torch.ones_like(input_ids)
    info = CalibrationInfo(source=source, sha256=token_sha256(input_ids, attention_mask),
                           num_samples=num_samples, seq_len=seq_len, seed=seed)
    return CalibrationSet(input_ids, attention_mask, info)


def load_calibration(source: str | os.PathLike, model_dir: str | os.PathLike, num_samples: int,
                     seq_len: int, seed: int) -> CalibrationSet:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise CalibrationError(f"{model_dir} has no usable tokenizer ({exc}); copy the model's tokenizer "
                               "files into it") from exc
    texts = read_calibration_texts(source)
    tokens = tokenize_corpus(texts, tokenizer)
    return sample_windows(tokens, num_samples, seq_len, seed, str(source))
