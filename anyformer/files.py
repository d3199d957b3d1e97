"""Outputs that appear whole or not at all: a file or a folder is written under a temporary
name beside its target and renamed into place at the end (a rename within one folder is
atomic), so a failure, a crash or Ctrl-C leaves the target as it was and nothing half-written,
and a retry needs no --force."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _missing_ancestors(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, nearest first."""
    out, parent = [], path.parent
    while not parent.exists() and parent != parent.parent:
        out.append(parent)
        parent = parent.parent
    return out


def _remove_created(folders: list[Path]) -> None:
    for folder in folders:  # nearest first; only the ones still empty
        try:
            folder.rmdir()
        except OSError:
            return


def _plain_permissions(path: Path, folder: bool) -> None:
    """The permissions an ordinary open or mkdir gives (mkstemp and mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod((0o777 if folder else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` when the block ends
    without an error, and is removed otherwise."""
    path = Path(path)
    created = _missing_ancestors(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _plain_permissions(tmp, folder=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_created(created)
        raise


@contextmanager
def staged_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; it becomes `path` when the block
    ends without an error and is removed otherwise (with any parent folders made for it).

    A `path` that exists must be empty, unless `replace`: then the old folder is removed only
    once the new one is complete."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; give a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise ValueError(f"{str(path)!r} exists and is not empty; give a new folder")
    created = _missing_ancestors(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    _plain_permissions(staging, folder=True)
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "folder")
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing file, a folder or bytes that are not UTF-8 raise one
    error naming `what` and the path (and, for the encoding, the byte and how to convert it)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; give a text file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. "
                         "iconv -f latin1 -t utf-8") from None


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure(fig: object, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to `path` (its format from the suffix) whole or not at all."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")  # type: ignore[attr-defined]
    return Path(path)
