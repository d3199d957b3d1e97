"""Mutation testing of the research code: plant one small bug at a time, run the tests that
cover the file, and count the mutants the tests catch ("killed"). Not part of CI (it is slow).

    python scripts/mutation.py                                   # anyformer/nn, models, longcontext
    python scripts/mutation.py --sample 40 --workers 2 --out benchmarks/results/mutation.json
    python scripts/mutation.py --files anyformer/nn/positional/magnetic.py

Mutants, one per site, found by walking each file's syntax tree: an arithmetic operator
swapped (+ -, * /, // /, ** *), a comparison flipped or loosened (< <=, > >=, == !=, in / not
in, is / is not), `and` / `or` swapped, a unary minus or `not` dropped, True / False swapped,
an integer constant n -> n + 1, a float constant x -> 2x (0 -> 1). Strings, docstrings, type
annotations, error messages and `raise` statements are left alone: the point is the numbers.

Tests for a file: its mirror under tests/ (anyformer/a/b.py -> tests/a/test_b.py), the tests of
its package folder when the mirror is missing, every test file that imports the module or names
its path (else the test files named for it anywhere under tests/), and the
conformance file of its family (attention, positional, architectures, blocks and depths,
parts). They run with -x in a copy of the repository (one per worker), so a killed mutant
costs only the time to its first failure; a run past --timeout counts as killed (an infinite
loop is caught), and is reported as such.

The report: per folder, mutants, killed, survived, timed out and the score killed / mutants,
and every survivor (file, line, the mutated line), to be judged: a survivor that computes the
same thing (an equivalent mutant) is listed in docs/testing.md with a reason; any other one is
a missing test.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["anyformer/nn", "anyformer/models", "anyformer/longcontext"]
CONFORMANCE = {
    "anyformer/nn/attention": "tests/conformance/test_attention.py",
    "anyformer/nn/positional": "tests/conformance/test_positional.py",
    "anyformer/models/blocks": "tests/conformance/test_blocks_and_depths.py",
    "anyformer/models/depth": "tests/conformance/test_blocks_and_depths.py",
    "anyformer/nn": "tests/conformance/test_parts.py",
    "anyformer/models": "tests/conformance/test_architectures.py",
}
SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.And: ast.Or, ast.Or: ast.And,
}


@dataclass
class Mutant:
    """One planted bug: where, what the line becomes, and what the tests made of it."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    replacement: str
    original: str
    status: str = "pending"  # killed | survived | timeout | pending
    seconds: float = 0.0

    @property
    def folder(self) -> str:
        return next((f for f in FOLDERS if self.file.startswith(f + "/")), str(Path(self.file).parent))


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes not to mutate: docstrings, annotations, f-strings, raise statements,
    assert statements (a test of the code itself) and what they contain."""
    out: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            out.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)):
            mark(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg]:
                if a is not None:
                    mark(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            mark(node.body[0])
    return out


def _variants(node: ast.AST) -> list[ast.AST]:
    """The mutated copies of `node` (empty when it is not a mutation site)."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
        m = copy.deepcopy(node)
        m.op = SWAPS[type(node.op)]()
        out.append(m)
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
        m = copy.deepcopy(node)
        m.ops = [SWAPS[type(node.ops[0])]()]
        out.append(m)
    elif isinstance(node, ast.BoolOp):
        m = copy.deepcopy(node)
        m.op = SWAPS[type(node.op)]()
        out.append(m)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(copy.deepcopy(node.operand))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append(ast.Constant(not node.value))
    elif isinstance(node, ast.Constant) and isinstance(node.value, int):
        out.append(ast.Constant(node.value + 1))
    elif isinstance(node, ast.Constant) and isinstance(node.value, float):
        out.append(ast.Constant(node.value * 2 if node.value else 1.0))
    return out


def mutants_of(path: Path) -> list[Mutant]:
    """Every mutant of one file, in source order."""
    source = path.read_text()
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        original = ast.get_source_segment(source, node)
        if original is None:
            continue
        for variant in _variants(node):
            out.append(Mutant(rel, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, ast.unparse(variant), original))
    return sorted(out, key=lambda m: (m.line, m.col))


def apply(source: str, m: Mutant) -> str:
    """`source` with the mutant's span (the AST's byte offsets) replaced, in parentheses."""
    data = source.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    start, end = starts[m.line - 1] + m.col, starts[m.end_line - 1] + m.end_col
    return (data[:start] + f"({m.replacement})".encode() + data[end:]).decode()


def relocate(m: Mutant) -> Mutant | None:
    """`m` where its file now holds it: unchanged if its span still reads `m.original`, else the
    same mutation (same original text, same replacement) nearest to its old line, or None when
    the file no longer has it (an earlier report, edits since)."""
    source = (ROOT / m.file).read_text()
    data = source.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    if m.end_line < len(starts):
        span = data[starts[m.line - 1] + m.col : starts[m.end_line - 1] + m.end_col]
        if span == m.original.encode():
            return m
    same = [c for c in mutants_of(ROOT / m.file) if c.original == m.original and c.replacement == m.replacement]
    return min(same, key=lambda c: abs(c.line - m.line)) if same else None


def tests_for(rel: str) -> list[str]:
    """The test files that cover source file `rel` (see the module docstring)."""
    p = Path(rel)
    parts = p.with_suffix("").parts[1:]  # anyformer/a/b -> (a, b)
    mirror = ROOT / "tests" / Path(*parts[:-1]) / f"test_{parts[-1]}.py"
    found = {mirror} if mirror.is_file() else set((ROOT / "tests" / Path(*parts[:-1])).glob("test_*.py"))
    module = re.escape(".".join(p.with_suffix("").parts))
    imports = re.compile(rf"(from {module} import|import {module}(?![\w.]))")
    for t in (ROOT / "tests").rglob("test_*.py"):
        text = t.read_text(errors="ignore")
        if imports.search(text) or rel in text:  # importers, and tests that name the file
            found.add(t)
    if not found:  # tests named for the file elsewhere (anyformer/longcontext/lm_infinite.py -> tests/generation/test_lm_infinite.py)
        found = set((ROOT / "tests").rglob(f"test_{parts[-1]}.py"))
    for folder, conformance in CONFORMANCE.items():
        if rel.startswith(folder + "/"):
            found.add(ROOT / conformance)
            break
    return sorted(str(f.relative_to(ROOT)) for f in found if f.is_file())


def _copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", "benchmarks", "docs")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _run(work: Path, tests: list[str], timeout: float) -> str:
    """killed (a test failed), survived (all passed) or timeout."""
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    if proc.returncode == 0:
        return "survived"
    if proc.returncode == 5:  # no tests collected
        return "survived"
    return "killed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folders", nargs="*", default=FOLDERS)
    p.add_argument("--files", nargs="*", default=None, help="these source files instead of --folders")
    p.add_argument("--sample", type=int, default=None, help="mutants drawn at random per folder (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    p.add_argument("--out", default=None, help="JSON report")
    p.add_argument("--check-baseline", action="store_true",
                   help="first run every test set once unmutated and stop if one fails (by default the suite is assumed green, as CI checks)")
    p.add_argument("--survivors-of", default=None, metavar="REPORT",
                   help="test again only the mutants that survived in an earlier JSON report (after adding tests)")
    args = p.parse_args()
    files = [ROOT / f for f in args.files] if args.files else sorted(f for d in args.folders for f in (ROOT / d).rglob("*.py"))
    by_folder: dict[str, list[Mutant]] = {}
    for f in files:
        for m in mutants_of(f):
            by_folder.setdefault(m.folder, []).append(m)
    rng = random.Random(args.seed)
    chosen = []
    for folder, ms in sorted(by_folder.items()):
        picked = ms if args.sample is None or args.sample >= len(ms) else sorted(rng.sample(ms, args.sample), key=lambda m: (m.file, m.line))
        print(f"{folder}: {len(ms)} mutation sites, testing {len(picked)}", flush=True)
        chosen += picked
    if args.survivors_of:
        old = json.loads(Path(args.survivors_of).read_text())["mutants"]
        again = [Mutant(**{**m, "status": "pending", "seconds": 0.0}) for m in old if m["status"] == "survived"]
        found = [relocate(m) for m in again]
        for m, where in zip(again, found):
            if where is None:
                print(f"  gone: {m.file}:{m.line} {m.original!r} (the code has changed there; not tested)", flush=True)
            elif where.line != m.line:
                print(f"  moved: {m.file}:{m.line} -> {where.line} {m.original!r}", flush=True)
        chosen = [where for where in found if where is not None]
        print(f"testing again the {len(chosen)} survivors of {args.survivors_of} still in the code", flush=True)
    tests = {m.file: tests_for(m.file) for m in chosen}
    with tempfile.TemporaryDirectory(prefix="anyformer-mutation-") as tmp:
        works = [Path(tmp) / f"w{i}" for i in range(args.workers)]
        for w in works:
            _copy_repo(w)
        free = list(works)
        if args.check_baseline:  # a test set that fails unmutated would count every mutant as killed
            sets = sorted({tuple(t) for t in tests.values() if t})
            with ThreadPoolExecutor(args.workers) as pool:
                failing = [t for t, status in zip(sets, pool.map(lambda t: _run(works[sets.index(t) % len(works)], list(t), args.timeout), sets))
                           if status != "survived"]
            if failing:
                print("these test sets fail without any mutant; fix them first:\n  " + "\n  ".join(" ".join(t) for t in failing))
                return 1
            print(f"baseline: all {len(sets)} test sets pass unmutated", flush=True)

        def one(m: Mutant) -> Mutant:
            work = free.pop()
            try:
                target = work / m.file
                original = target.read_text()
                target.write_text(apply(original, m))
                start = time.perf_counter()
                m.status = _run(work, tests[m.file], args.timeout) if tests[m.file] else "survived"
                m.seconds = time.perf_counter() - start
                target.write_text(original)
            finally:
                free.append(work)
            mark = {"killed": ".", "timeout": "T", "survived": "S"}[m.status]
            print(f"{mark} {m.file}:{m.line} {m.original!r} -> {m.replacement!r} ({m.seconds:.0f} s)", flush=True)
            return m

        with ThreadPoolExecutor(args.workers) as pool:
            done = list(pool.map(one, chosen))
    print("\nfolder                      mutants  killed  timeout  survived  score")
    summary = {}
    for folder in sorted({m.folder for m in done}):
        ms = [m for m in done if m.folder == folder]
        k, t, s = (sum(m.status == x for m in ms) for x in ("killed", "timeout", "survived"))
        summary[folder] = {"mutants": len(ms), "killed": k, "timeout": t, "survived": s, "sites": len(by_folder[folder])}
        print(f"{folder:<28}{len(ms):>7}{k:>8}{t:>9}{s:>10}  {(k + t) / len(ms):.1%}")
    print("\nsurvivors (judge each: equivalent, or a missing test):")
    for m in done:
        if m.status == "survived":
            print(f"  {m.file}:{m.line}  {m.original}  ->  {m.replacement}   [{', '.join(tests[m.file]) or 'no tests'}]")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "mutants": [asdict(m) for m in done],
                                              "command": " ".join(sys.argv)}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
