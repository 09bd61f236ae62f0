"""The bundled models, trained here: moe_mini (the demo model, KJV) and moe_fine (the production regime).

Public API:
  bundled_model_dir(name)    -> the committed Hugging Face directory of "moe_mini" (default) or "moe_fine"
                                (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                                generation_config.json)
  training_record_path(name) -> its training_record.json
  offline.bundled.sources    -> the other texts (Python docs, Debian Reference, Devil's Dictionary)
  corpus_split_path(split)   -> the committed text of "train" | "validation" | "test"
  read_split(split)          -> that text; read_documents(split) -> its chapters
  TRAINING_RECORD            -> training_record.json (options, seed, steps, wall time, loss curve)

See docs/bundled-model.md for provenance, training record and evaluation.
"""

from __future__ import annotations

from pathlib import Path

from offline.bundled.corpus import SPLITS, corpus_split_path, read_documents, read_split

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODELS = {"moe_mini": "training", "moe_fine": "training_fine"}  # model directory -> record directory
TRAINING_RECORD = PACKAGE_DIR / "training" / "training_record.json"

__all__ = [
    "SPLITS",
    "TRAINING_RECORD",
    "BUNDLED_MODELS",
    "bundled_model_dir",
    "training_record_path",
    "corpus_split_path",
    "read_documents",
    "read_split",
]


def _known(name: str) -> str:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {sorted(BUNDLED_MODELS)}")
    return name


def bundled_model_dir(name: str = "moe_mini") -> Path:
    """The committed Hugging Face directory of a bundled model (raises if it is missing)."""
    model_dir = PACKAGE_DIR / _known(name)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"bundled model missing at {model_dir}: train it with `python -m "
                                f"offline.bundled.train --preset {name} --out {model_dir}`")
    return model_dir


def training_record_path(name: str = "moe_mini") -> Path:
    return PACKAGE_DIR / BUNDLED_MODELS[_known(name)] / "training_record.json"
