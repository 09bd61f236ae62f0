"""Small lm-evaluation-harness tasks built from the bundled corpus's held-out test split (no download).

  kjv_next_sentence  multiple choice: which of 4 sentences follows the passage (the true next sentence
                     and 3 of similar length from other chapters of the test split); acc, acc_norm.
  kjv_cloze          LAMBADA-style cloze: the last word of a sentence given the passage before it;
                     acc (the word is the greedy continuation) and perplexity of the word.

The YAML files here are ordinary lm-eval task configs (`custom_dataset` reads the JSON next to them):
`moesvd ab --tasks kjv_next_sentence,kjv_cloze` finds them, and so does lm-eval itself with
`lm_eval --include_path serve/lm_tasks --tasks kjv_cloze ...`. The JSON data are written by
`python -m serve.lm_tasks.build` (deterministic; tests/test_ab_tasks.py checks the committed files).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("kjv_next_sentence", "kjv_cloze")
