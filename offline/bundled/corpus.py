"""The bundled model's corpus: the King James Version of the Bible, from Debian's `bible-kjv-text`.

Provenance (also in docs/bundled-model.md):
  Debian package `bible-kjv-text` 4.38 (source package `bible-kjv`), file /usr/lib/bible.data, read with
  the `bible` program of the Debian package `bible-kjv` 4.38. The KJV text (1611) is in the public
  domain (copyright expired; stated so in the package's copyright file); the package's software is
  GPL-2+.

Cleaning: `bible -f` prints one verse a line, prefixed with its reference ("Ge1:1 In the beginning ...").
The reference is stripped and the verses of one chapter are joined with single spaces into one
paragraph. A chapter is one document (1,189 in all).

Split (deterministic, by chapter, in canonical book order): chapter index i % 20 == 18 goes to
validation, i % 20 == 19 to test, everything else to train (90/5/5). Each split file holds its
chapters separated by one blank line.

Re-creating the committed split files (needs the two .deb files, e.g. `apt-get download bible-kjv-text
bible-kjv` and `dpkg-deb -x FILE DIR` for each into the same DIR):
    python -m offline.bundled.corpus --extracted-debs DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_DIR = Path(__file__).resolve().parent / "kjv_text"
DOCUMENT_SEPARATOR = "\n\n"

# "Ge1:1 text", "1Co13:4 text", "Rev22:21 text", "So1:1 text"
_VERSE_LINE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


@dataclass(frozen=True)
class SplitRule:
    """Chapter i goes to validation when i % period == validation_residue, to test when == test_residue."""

    period: int = 20
    validation_residue: int = 18
    test_residue: int = 19

    def split_of(self, chapter_index: int) -> str:
        residue = chapter_index % self.period
        if residue == self.validation_residue:
            return "validation"
        if residue == self.test_residue:
            return "test"
        return "train"


def corpus_split_path(split: str) -> Path:
    """Path of the committed text file of one split ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLIT_DIR / f"{split}.txt"


def read_split(split: str) -> str:
    """The text of one split: chapters (documents) separated by blank lines."""
    path = corpus_split_path(split)
    if not path.is_file():
        raise FileNotFoundError(f"corpus split file missing: {path} (run `python -m offline.bundled.corpus`)")
    return path.read_text(encoding="utf-8")


def read_documents(split: str) -> list[str]:
    """The documents (one chapter each) of one split, in order."""
    return [doc for doc in read_split(split).split(DOCUMENT_SEPARATOR) if doc.strip()]


def chapters_from_verse_lines(lines: list[str]) -> list[str]:
    """Group `bible -f` output lines ("Ge1:1 text") into chapter paragraphs, references stripped."""
    chapters: list[str] = []
    current_key: tuple[str, str] | None = None
    current_verses: list[str] = []
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        match = _VERSE_LINE.match(line)
        if match is None:
            raise ValueError(f"line {line_number} is not a verse line: {line[:80]!r}")
        key = (match["book"], match["chapter"])
        if key != current_key and current_verses:
            chapters.append(" ".join(current_verses))
            current_verses = []
        current_key = key
        current_verses.append(" ".join(match["text"].split()))
    if current_verses:
        chapters.append(" ".join(current_verses))
    return chapters


def dump_verse_lines(extracted_debs: Path) -> list[str]:
    """Run the packaged `bible` program over the whole text, one verse a line with its reference."""
    program = extracted_debs / "usr" / "bin" / "bible"
    data_dir = extracted_debs / "usr" / "lib"
    if not program.is_file() or not (data_dir / "bible.data").is_file():
        raise FileNotFoundError(f"expected usr/bin/bible and usr/lib/bible.data under {extracted_debs}")
    result = subprocess.run(
        [str(program), "-f", "-p", str(data_dir), "-d", "bible.data", "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    )
    return result.stdout.splitlines()


def write_splits(chapters: list[str], out_dir: Path, rule: SplitRule = SplitRule()) -> dict[str, int]:
    """Write train/validation/test files atomically; returns the number of chapters in each."""
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, chapter in enumerate(chapters):
        by_split[rule.split_of(index)].append(chapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in by_split.items():
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(DOCUMENT_SEPARATOR.join(docs) + "\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_dir / f"{split}.txt")
    return {split: len(docs) for split, docs in by_split.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extracted-debs", type=Path, required=True,
                        help="directory holding the extracted bible-kjv and bible-kjv-text packages")
    parser.add_argument("--out", type=Path, default=SPLIT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    chapters = chapters_from_verse_lines(dump_verse_lines(args.extracted_debs))
    counts = write_splits(chapters, args.out)
    LOG.info("wrote %d chapters to %s: %s", len(chapters), args.out, counts)


if __name__ == "__main__":
    main()
