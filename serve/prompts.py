"""Prompt sets for `moesvd ab`: the same texts go to both arms.

Each prompt is used twice: as a generation prompt (speed, greedy outputs) and as held-out text whose
per-token log-likelihood both arms report (quality). Sources:
  - a JSONL file, one object a line: {"prompt": "...", "id": "optional name"};
  - a plain text file, cut into windows of consecutive words (`prompts_from_text_file`);
  - the built-in set: windows of the bundled model's held-out corpus (the KJV test split).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

JSONL_KEYS = {"prompt", "id"}
DEFAULT_NUM_PROMPTS = 32
DEFAULT_WORDS_PER_PROMPT = 48
DEFAULT_SEED = 0


class PromptError(ValueError):
    """A prompt file cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def prompts_sha256(prompts: list[Prompt]) -> str:
    """A hash of the prompt texts in order (recorded in every report, to tell runs apart)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def prompts_from_jsonl(path: Path, limit: int | None = None) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(_prompt_from_json_line(path, number, line))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PromptError(f"{path} holds no prompts; write one JSON object a line: {{\"prompt\": \"...\"}}")
    return prompts


def _prompt_from_json_line(path: Path, number: int, line: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptError(f"{where}: not JSON ({err.msg}); write one object a line: "
                          "{\"prompt\": \"...\"}") from None
    if not isinstance(item, dict):
        raise PromptError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got "
                          f"{type(item).__name__}")
    unknown = set(item) - JSONL_KEYS
    if unknown:
        raise PromptError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(JSONL_KEYS)}")
    text = item.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"{where}: 'prompt' must be a non-empty string")
    return Prompt(id=str(item.get("id", f"line{number}")), text=text)


def prompts_from_text(text: str, *, num_prompts: int = DEFAULT_NUM_PROMPTS,
                      words_per_prompt: int = DEFAULT_WORDS_PER_PROMPT, seed: int = DEFAULT_SEED,
                      source: str = "text") -> list[Prompt]:
    """`num_prompts` windows of `words_per_prompt` consecutive words, chosen with a seeded RNG.

    Windows never cross a blank line (a document boundary) and never overlap; they come back in the
    order they appear in the text.
    """
    if num_prompts < 1 or words_per_prompt < 1:
        raise PromptError("num_prompts and words_per_prompt must be at least 1")
    windows: list[tuple[int, int, str]] = []
    for doc_index, document in enumerate(text.split("\n\n")):
        words = document.split()
        for start in range(0, len(words) - words_per_prompt + 1, words_per_prompt):
            windows.append((doc_index, start, " ".join(words[start:start + words_per_prompt])))
    if len(windows) < num_prompts:
        raise PromptError(f"{source} yields only {len(windows)} windows of {words_per_prompt} words; "
                          f"ask for fewer prompts or shorter ones")
    chosen = sorted(random.Random(seed).sample(range(len(windows)), num_prompts))
    return [Prompt(id=f"{source}:doc{windows[i][0]}:word{windows[i][1]}", text=windows[i][2])
            for i in chosen]


def prompts_from_text_file(path: Path, **kwargs) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"text file not found: {path}")
    return prompts_from_text(path.read_text(encoding="utf-8"), source=path.name, **kwargs)


def builtin_prompts(*, num_prompts: int = DEFAULT_NUM_PROMPTS,
                    words_per_prompt: int = DEFAULT_WORDS_PER_PROMPT,
                    seed: int = DEFAULT_SEED) -> list[Prompt]:
    """Windows of the bundled model's held-out corpus (test split, never seen in training)."""
    from offline.bundled.corpus import corpus_split_path

    return prompts_from_text_file(corpus_split_path("test"), num_prompts=num_prompts,
                                  words_per_prompt=words_per_prompt, seed=seed)


def load_prompts(path: Path | None, *, num_prompts: int = DEFAULT_NUM_PROMPTS,
                 words_per_prompt: int = DEFAULT_WORDS_PER_PROMPT,
                 seed: int = DEFAULT_SEED) -> tuple[list[Prompt], str]:
    """(prompts, description of their source). JSONL files by content, other files as plain text."""
    if path is None:
        return (builtin_prompts(num_prompts=num_prompts, words_per_prompt=words_per_prompt, seed=seed),
                "built-in: bundled corpus test split")
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return prompts_from_jsonl(path, limit=num_prompts), f"jsonl: {path}"
    return (prompts_from_text_file(path, num_prompts=num_prompts, words_per_prompt=words_per_prompt,
                                   seed=seed), f"text: {path}")
