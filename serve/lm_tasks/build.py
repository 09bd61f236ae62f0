"""Write the data of the local lm-eval tasks from the bundled corpus's test split (deterministic).

    python -m serve.lm_tasks.build          # rewrites serve/lm_tasks/kjv_*.json
    python -m serve.lm_tasks.build --check  # exit 1 when the committed files differ from a fresh build

Sentences: each chapter (one paragraph of the test split) is cut after '.', '?' or '!' followed by a
capital letter. Documents are drawn with a seeded RNG and kept in corpus order.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys

from serve.lm_tasks import TASKS_DIR

SEED = 0
NUM_DOCS = 300
NUM_CHOICES = 4
SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
FINAL_WORD = re.compile(r"^(?P<head>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<tail>[^A-Za-z]*)$")
MIN_WORDS, MAX_WORDS = 6, 40
LENGTH_SLACK = 0.25  # distractors within +-25 % of the true sentence's word count


def chapters_as_sentences(text: str) -> list[list[str]]:
    return [SENTENCE_END.split(chapter.strip()) for chapter in text.split("\n\n") if chapter.strip()]


def _fits(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def _halves(sentence: str) -> tuple[str, str] | None:
    """(beginning, ending) cut at the word boundary nearest the middle; None when too short."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def sentence_ending_docs(chapters: list[list[str]], rng: random.Random) -> list[dict]:
    """{"context", "choices", "label", "id"}: the previous sentence and the first half of a sentence; the
    true second half and 3 second halves of similar length from other chapters (HellaSwag-style endings)."""
    positions = [(c, i) for c, sentences in enumerate(chapters) for i in range(1, len(sentences))
                 if _halves(sentences[i])]
    endings = [(c, _halves(s)[1]) for c, sentences in enumerate(chapters) for s in sentences if _halves(s)]
    docs = []
    for c, i in sorted(rng.sample(positions, min(NUM_DOCS, len(positions)))):
        beginning, true = _halves(chapters[c][i])
        length = len(true.split())
        similar = [e for other, e in endings if other != c and e != true
                   and abs(len(e.split()) - length) <= LENGTH_SLACK * length]
        choices = rng.sample(similar, NUM_CHOICES - 1)
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, true)
        docs.append({"id": f"ch{c}:s{i}", "context": f"{chapters[c][i - 1]} {beginning}",
                     "choices": choices, "label": label})
    return docs


def cloze_docs(chapters: list[list[str]], rng: random.Random) -> list[dict]:
    """{"context", "target", "id"}: a passage up to a sentence's last word; the word, with its space."""
    candidates = []
    for c, sentences in enumerate(chapters):
        for i in range(1, len(sentences)):
            match = FINAL_WORD.match(sentences[i])
            if match and 8 <= len(sentences[i].split()) <= 60 and len(sentences[i - 1].split()) <= 60:
                candidates.append((c, i, match))
    docs = []
    for c, i, match in sorted(rng.sample(candidates, min(NUM_DOCS, len(candidates))), key=lambda x: x[:2]):
        docs.append({"id": f"ch{c}:s{i}", "context": f"{chapters[c][i - 1]} {match['head']}",
                     "target": " " + match["word"]})
    return docs


def build() -> dict[str, dict]:
    """{file name: its JSON content} of every local task."""
    from offline.bundled.corpus import corpus_split_path

    source = corpus_split_path("test")
    chapters = chapters_as_sentences(source.read_text(encoding="utf-8"))
    header = {"source": "offline/bundled/kjv_text/test.txt (the bundled model's held-out split)",
              "builder": "python -m serve.lm_tasks.build", "seed": SEED}
    return {"kjv_sentence_ending.json": {**header, "docs": sentence_ending_docs(chapters, random.Random(SEED))},
            "kjv_cloze.json": {**header, "docs": cloze_docs(chapters, random.Random(SEED + 1))}}


def serialise(content: dict) -> str:
    return json.dumps(content, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.lm_tasks.build", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in build().items():
        path = TASKS_DIR / name
        text = serialise(content)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(content['docs'])} documents)")
    if stale:
        print(f"stale task data: {stale}; run `python -m serve.lm_tasks.build`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
