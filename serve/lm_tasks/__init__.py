"""Small lm-evaluation-harness tasks built from the bundled corpus's held-out test split (no download).

  kjv_sentence_ending  multiple choice, HellaSwag-style: the previous sentence and the first half of a
                       sentence; which of 4 endings completes it (the true second half and 3 second
                       halves of similar length from other chapters of the test split); acc, acc_norm.
  kjv_cloze            LAMBADA-style cloze: the last word of a sentence given the passage before it;
                       acc (the word is the greedy continuation) and perplexity of the word.

The YAML files here are ordinary lm-eval task configs (`custom_dataset` reads the JSON next to them):
`moesvd ab --tasks kjv_sentence_ending,kjv_cloze` finds them, and so does lm-eval itself with
`lm_eval --include_path serve/lm_tasks --tasks kjv_cloze ...`. The JSON data are written by
`python -m serve.lm_tasks.build` (deterministic; tests/test_ab_tasks.py checks the committed files).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("kjv_sentence_ending", "kjv_cloze")
