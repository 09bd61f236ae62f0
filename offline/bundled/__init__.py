"""The bundled demo model: a small Qwen3-MoE trained here on the King James Version text.

Public API:
  bundled_model_dir()        -> the committed Hugging Face directory (config.json, model.safetensors,
                                tokenizer.json, tokenizer_config.json, generation_config.json)
  corpus_split_path(split)   -> the committed text of "train" | "validation" | "test"
  read_split(split)          -> that text; read_documents(split) -> its chapters
  TRAINING_RECORD            -> training_record.json (options, seed, steps, wall time, loss curve)

See docs/bundled-model.md for provenance, training record and evaluation.
"""

from __future__ import annotations

from pathlib import Path

from offline.bundled.corpus import SPLITS, corpus_split_path, read_documents, read_split

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_DIR_NAME = "moe_mini"
TRAINING_RECORD = PACKAGE_DIR / "training" / "training_record.json"

__all__ = [
    "SPLITS",
    "TRAINING_RECORD",
    "bundled_model_dir",
    "corpus_split_path",
    "read_documents",
    "read_split",
]


def bundled_model_dir() -> Path:
    """The committed Hugging Face directory of the bundled model (raises if it is missing)."""
    model_dir = PACKAGE_DIR / MODEL_DIR_NAME
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled model missing at {model_dir}: train it with `python -m offline.bundled.train --out {model_dir}`"
        )
    return model_dir
