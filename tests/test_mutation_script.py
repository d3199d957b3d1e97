"""scripts/mutation.py (not run in CI; these check its bookkeeping): a mutant replaces exactly
its span, and a survivor of an earlier report is found again after the file moved around it,
or reported gone when the code there changed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation.py"


@pytest.fixture()
def mutation(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "mutation_script", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def test_a_mutant_replaces_its_span_and_is_found_again_after_edits(mutation, tmp_path) -> None:
    f = tmp_path / "pkg" / "mod.py"
    f.parent.mkdir()
    f.write_text("def area(w, h):\n    return w * h + 1\n")
    sub = next(m for m in mutation.mutants_of(f) if m.original == "w * h + 1" and m.replacement == "w * h - 1")
    namespace: dict = {}
    exec(mutation.apply(f.read_text(), sub), namespace)
    assert namespace["area"](3, 4) == 11
    assert mutation.relocate(sub) == sub
    f.write_text("'''A module.'''\n\n\ndef area(w, h):\n    return w * h + 1\n")  # three lines above it now
    moved = mutation.relocate(sub)
    assert moved is not None and moved.line == sub.line + 3 and moved.original == sub.original
    namespace = {}
    exec(mutation.apply(f.read_text(), moved), namespace)
    assert namespace["area"](3, 4) == 11
    f.write_text("def area(w, h):\n    return w * (h + 1)\n")  # the expression is gone
    assert mutation.relocate(sub) is None


def test_the_tests_of_a_file_are_its_mirror_its_importers_and_those_naming_it(mutation, tmp_path) -> None:
    for rel, text in {"anyformer/pkg/mod.py": "x = 1\n", "tests/pkg/test_mod.py": "", "tests/test_uses.py": "from anyformer.pkg.mod import x\n",
                      "tests/other/test_names.py": '"""Checks anyformer/pkg/mod.py against a reference."""\n',
                      "tests/other/test_unrelated.py": "import anyformer.pkg.modern\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert mutation.tests_for("anyformer/pkg/mod.py") == ["tests/other/test_names.py", "tests/pkg/test_mod.py", "tests/test_uses.py"]
