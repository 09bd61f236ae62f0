"""Dataset loaders of the local tasks (lm-eval `custom_dataset`): the JSON files next to this module.

lm-eval imports this file by its path (the YAML's `!function kjv_tasks.<name>`), so it imports nothing
from the repository: only the standard library and `datasets` (an lm-eval dependency).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dataset(file_name: str):
    import datasets

    docs = json.loads((HERE / file_name).read_text(encoding="utf-8"))["docs"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def sentence_ending(**kwargs):
    return _dataset("kjv_sentence_ending.json")


def cloze(**kwargs):
    return _dataset("kjv_cloze.json")
