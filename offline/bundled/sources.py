"""The bundled models' text sources beyond the KJV: Debian packages, each cut into documents and split.

    python -m offline.bundled.sources --extracted-debs DIR   # DIR: the .deb files below, `dpkg-deb -x`-ed

| source | Debian package | license | role |
|---|---|---|---|
| kjv | bible-kjv-text 4.38 | public domain | trained on (both models); `offline.bundled.corpus` |
| python-docs | python3.11-doc 3.11.2-6+deb12u9 | PSF-2.0 | trained on (the production-regime model) |
| debian-reference | debian-reference-en 2.100 | GPL-2+ | trained on (the production-regime model) |
| devils-dictionary | dict-devil 1.0-13.1 | public domain | never trained on: out-of-domain text only |

A document is a run of consecutive non-blank lines of one source file, cut at a blank line once it
holds at least `CHUNK_CHARS` characters (blank lines inside a document are dropped, indentation kept, so
documents can be joined with blank lines like the KJV chapters). Documents are numbered in file order
and split by the KJV's rule (`SplitRule`: i % 20 == 18 validation, == 19 test, else train).
Python docs: the reStructuredText sources (`html/_sources/**/*.rst.txt`) of the tutorial, language
reference, HOWTOs, FAQ, "using" and "extending" guides, and every third file (sorted by path) of the
library reference, to keep the committed text near 4 MB.
"""

from __future__ import annotations

import argparse
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

from offline.bundled.corpus import DOCUMENT_SEPARATOR, SPLITS, SplitRule, write_splits

LOG = logging.getLogger(__name__)

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
KJV_DIR = Path(__file__).resolve().parent / "kjv_text"
CHUNK_CHARS = 2000
_PYTHON_DOC_PARTS = ("tutorial", "reference", "howto", "faq", "using", "extending")
_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class TextSource:
    name: str
    package: str
    license: str
    trained_on: bool


SOURCES = {
    source.name: source
    for source in (
        TextSource("kjv", "bible-kjv-text 4.38", "public domain", True),
        TextSource("python-docs", "python3.11-doc 3.11.2-6+deb12u9", "PSF-2.0", True),
        TextSource("debian-reference", "debian-reference-en 2.100", "GPL-2+", True),
        TextSource("devils-dictionary", "dict-devil 1.0-13.1", "public domain", False),
    )
}


def source_dir(name: str) -> Path:
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; expected one of {sorted(SOURCES)}")
    # a directory name that is a Python identifier, so setuptools ships it as package data
    return KJV_DIR if name == "kjv" else TEXTS_DIR / name.replace("-", "_")


def read_source_documents(name: str, split: str) -> list[str]:
    """The documents of one split of one source (committed files)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = source_dir(name) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"text source file missing: {path} (run `python -m offline.bundled.sources`)")
    return [doc for doc in path.read_text(encoding="utf-8").split(DOCUMENT_SEPARATOR) if doc.strip()]


def chunk_lines(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a text into documents of consecutive non-blank lines, at the first blank line past chunk_chars."""
    documents, current, size = [], [], 0
    for line in text.splitlines():
        if line.strip():
            line = line.rstrip().replace("\f", "")
            current.append(line)
            size += len(line) + 1
        elif size >= chunk_chars:
            documents.append("\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n".join(current))
    return documents


def python_doc_files(extracted: Path) -> list[Path]:
    root = extracted / "usr/share/doc/python3.11/html/_sources"
    if not root.is_dir():
        raise FileNotFoundError(f"expected the python3.11-doc sources under {root}")
    files = [path for part in _PYTHON_DOC_PARTS for path in sorted((root / part).rglob("*.rst.txt"))]
    library = sorted((root / "library").rglob("*.rst.txt"))
    return files + library[::3]


def python_doc_documents(extracted: Path) -> list[str]:
    return [doc for path in python_doc_files(extracted) for doc in chunk_lines(path.read_text(encoding="utf-8"))]


def debian_reference_documents(extracted: Path) -> list[str]:
    path = extracted / "usr/share/debian-reference/debian-reference.en.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"expected the plain-text Debian Reference at {path}")
    return chunk_lines(gzip.decompress(path.read_bytes()).decode("utf-8"))


def _dict_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICT_B64.index(char)
    return value


def devils_dictionary_documents(extracted: Path) -> list[str]:
    """One document per dictionary entry (dictd index: headword, base64 offset, base64 length)."""
    base = extracted / "usr/share/dictd"
    data = gzip.decompress((base / "devil.dict.dz").read_bytes())
    documents = []
    for line in (base / "devil.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if headword.startswith("00database"):
            continue
        start = _dict_number(offset)
        entry = data[start : start + _dict_number(length)].decode("utf-8")
        documents.extend(chunk_lines(entry, chunk_chars=10**9))
    return documents


EXTRACTORS = {
    "python-docs": python_doc_documents,
    "debian-reference": debian_reference_documents,
    "devils-dictionary": devils_dictionary_documents,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extracted-debs", type=Path, required=True,
                        help="directory holding python3.11-doc, debian-reference-en and dict-devil extracted")
    parser.add_argument("--out", type=Path, default=TEXTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, extract in EXTRACTORS.items():
        documents = extract(args.extracted_debs)
        counts = write_splits(documents, args.out / source_dir(name).name, SplitRule())
        LOG.info("%s: %d documents, %d bytes: %s", name, len(documents),
                 sum(len(d.encode()) for d in documents), counts)


if __name__ == "__main__":
    main()
