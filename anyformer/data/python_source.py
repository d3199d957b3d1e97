"""Where Python source files are found: the standard library's folder and the .py files under a
folder (read by the code-graph tasks and the python_stdlib corpus)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

SKIP_DIRS = ("test", "tests", "idlelib", "site-packages", "__pycache__")


def stdlib_root() -> Path:
    """The folder of this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> list[tuple[str, Path]]:
    """(module path relative to `root`, file) of every .py file under `root` (or `root` itself
    when it is a file), sorted, skipping folders named test, tests, idlelib, site-packages and
    __pycache__ below the root."""
    root = Path(root)
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise FileNotFoundError(f"no folder or file of Python code at {str(root)!r}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not set(rel.parts[:-1]) & set(SKIP_DIRS) and path.is_file():
            out.append((rel.as_posix(), path))
    return sorted(out)
