"""Python functions as directed graphs, for naming a function from its body (the setting of
OGB's ogbg-code2; Geisler et al. 2023 use it as the headline benchmark of direction-aware
Transformers).

One graph per function (`def` and `async def`, methods and nested functions included; a
nested function is also a subtree of the function around it). Nodes, in pre-order (depth
first, children in `ast.iter_fields` order):

- every AST node of the function, its token the node type (`Call`, `Name`, `arg`, ...), except
  the expression contexts (Load/Store/Del: the data-flow edges carry that); a constant's token
  says its kind only (`Constant:str`, `Constant:int`, `Constant:True`, `Constant:0`, ...):
  string contents (docstrings, messages) are never input;
- every identifier (a variable, attribute, argument, keyword, import, class or nested function
  name; dotted names split at the dots) becomes child nodes of its AST node, one per subtoken
  (`maxLen`/`max_len` -> `$max`, `$len`: snake_case and camelCase split, lowercased, `$`
  marking identifier subtokens apart from node types); an identifier without letters or
  digits (`_`) is the one node `$_`;
- the function's own name is never input: the def's name is not a node, and an identifier
  whose subtokens equal the name's (recursion `fib(...)`, `self._fib`) is the single node
  `<fn>`.

Directed edges (all three kinds are kept apart in `CodeGraph`):

- parent -> child, for every node but the root;
- next sibling: each child -> the next child of the same parent;
- data flow, definition -> use: a binding of a variable (a function or lambda argument, an
  assignment / augmented / annotated assignment / walrus target, a for or comprehension
  target, `with ... as`, `except ... as`, an import, a nested def or class, a match capture)
  -> each load of that variable that resolves to it: in the same scope, the loads that come
  later in evaluation order (the value of an assignment before its targets, a loop's iterable
  before its target; `x += 1` reads then writes); in a nested function, lambda or
  comprehension, loads of a variable bound in an enclosing function scope (a closure) get
  edges from every binding there. Python's scoping is followed: a variable is local to a scope
  when it is bound anywhere in it, `global` names get no edges, `nonlocal` names bind in the
  enclosing scope, class bodies are not seen by the functions inside them, a walrus in a
  comprehension binds in the enclosing scope. It is a may-reach over-approximation: no
  binding kills an earlier one (both branches of an `if` reach the code after it) and there
  are no edges back around loops. Names of the module (globals, builtins, the function
  itself) get none.

The target is the function's name as subtokens (`__init__` -> [init], `readLine` -> [read,
line]); functions whose name has no subtoken (`_`) are skipped.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .python_source import SKIP_DIRS, python_files, stdlib_root

CACHE_VERSION = "1"  # bump when the graphs built from the same files change
FN_TOKEN = "<fn>"  # the function's own name in its body
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_NOT_IDENTIFIERS = {("Constant", "value"), ("Constant", "kind")}


def split_subtokens(identifier: str) -> list[str]:
    """An identifier's lowercase subtokens: snake_case, camelCase and digits split
    (`HTTPServer2_get` -> [http, server, 2, get]); [] when it has no letters or digits."""
    return [w.lower() for w in _WORD.findall(identifier)]


@dataclass
class CodeGraph:
    """One function: node tokens in pre-order and directed edges (src, dst) between them.

    name: the function's name (the target is `split_subtokens(name)`); module: the file's
    path relative to the root it was read from; lineno: the line of its `def`.
    """

    name: str
    module: str
    lineno: int
    tokens: list[str]
    child_edges: list[tuple[int, int]] = field(default_factory=list)
    sibling_edges: list[tuple[int, int]] = field(default_factory=list)
    flow_edges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def target(self) -> list[str]:
        return split_subtokens(self.name)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def edges(self) -> list[tuple[int, int]]:
        """Every directed edge, of all three kinds."""
        return [*self.child_edges, *self.sibling_edges, *self.flow_edges]


def constant_token(value: object) -> str:
    """The token of a constant: its kind, or the value itself for None/True/False/Ellipsis and
    the small integers -1..2."""
    if value is None or value is Ellipsis or isinstance(value, bool):
        return f"Constant:{value}"
    if isinstance(value, int) and -1 <= value <= 2:
        return f"Constant:{value}"
    return f"Constant:{type(value).__name__}"


class _Builder:
    """Nodes and parent/sibling edges of one function in pre-order."""

    def __init__(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.fn, self.fn_subtokens = fn, split_subtokens(fn.name)
        self.tokens: list[str] = []
        self.child_edges: list[tuple[int, int]] = []
        self.sibling_edges: list[tuple[int, int]] = []
        self.index: dict[int, int] = {}  # id(AST node) -> node index
        self._last_child: dict[int, int] = {}

    def add(self, token: str, parent: int | None) -> int:
        i = len(self.tokens)
        self.tokens.append(sys.intern(token))
        if parent is not None:
            self.child_edges.append((parent, i))
            if parent in self._last_child:
                self.sibling_edges.append((self._last_child[parent], i))
            self._last_child[parent] = i
        return i

    def identifier(self, text: str, parent: int) -> None:
        for part in text.split("."):
            subs = split_subtokens(part)
            if subs == self.fn_subtokens:
                self.add(FN_TOKEN, parent)
            else:
                for s in subs or ["_"]:
                    self.add("$" + s, parent)

    def visit(self, node: ast.AST, parent: int | None) -> None:
        kind = type(node).__name__
        i = self.add(constant_token(node.value) if isinstance(node, ast.Constant) else kind, parent)
        self.index[id(node)] = i
        for name, value in ast.iter_fields(node):
            if (node is self.fn and name == "name") or name == "type_comment" or (kind, name) in _NOT_IDENTIFIERS:
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, ast.expr_context):
                    continue
                if isinstance(v, ast.AST):
                    self.visit(v, i)
                elif isinstance(v, str):
                    self.identifier(v, i)


class _Scope:
    def __init__(self, kind: str, parent: "_Scope | None") -> None:
        self.kind, self.parent = kind, parent
        self.bindings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # name -> [(order, node)]
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()


class _DataFlow:
    """Definition -> use edges of one function (the rule in the module docstring)."""

    def __init__(self, index: dict[int, int]) -> None:
        self.index, self.order = index, 0
        self.uses: list[tuple[_Scope, str, int, int]] = []

    def run(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[int, int]]:
        self.function(fn, _Scope("module", None))
        edges = set()
        for scope, name, node, order in self.uses:
            found = self.resolve(scope, name)
            if found is not None:
                where, local = found
                edges.update((d, node) for o, d in where.bindings[name] if d != node and (o < order or not local))
        return sorted(edges)

    # -- scopes
    def resolve(self, scope: _Scope, name: str) -> tuple[_Scope, bool] | None:
        if name in scope.globals:
            return None
        if name not in scope.nonlocals and name in scope.bindings:
            return scope, True
        s = scope.parent
        while s is not None:
            if s.kind in ("function", "comprehension") and name in s.bindings and name not in s.globals:
                return s, False
            s = s.parent
        return None

    def bind(self, scope: _Scope, name: str, node: ast.AST) -> None:
        if name in scope.globals:
            return
        if name in scope.nonlocals:
            found = self.resolve(scope.parent, name) if scope.parent else None
            if found is None:
                return
            scope = found[0]
        scope.bindings[name].append((self.order, self.index[id(node)]))
        self.order += 1

    def use(self, scope: _Scope, name: str, node: ast.AST) -> None:
        self.uses.append((scope, name, self.index[id(node)], self.order))
        self.order += 1

    # -- traversal in evaluation order
    def walk(self, node: ast.AST | list | None, scope: _Scope) -> None:
        if node is None:
            return
        if isinstance(node, list):
            for n in node:
                self.walk(n, scope)
            return
        method = getattr(self, "do_" + type(node).__name__, None)
        if method is not None:
            method(node, scope)
        else:
            for child in ast.iter_child_nodes(node):
                self.walk(child, scope)

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, scope: _Scope) -> None:
        a = node.args
        self.walk([*a.defaults, *[d for d in a.kw_defaults if d is not None]], scope)
        params = [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs, *([a.kwarg] if a.kwarg else [])]
        if not isinstance(node, ast.Lambda):
            self.walk(node.decorator_list, scope)
            self.walk([p.annotation for p in params], scope)
            self.walk(node.returns, scope)
        inner = _Scope("function", scope)
        for p in params:
            self.bind(inner, p.arg, p)
        self.walk(node.body, inner)

    def do_FunctionDef(self, node: ast.FunctionDef, scope: _Scope) -> None:
        self.function(node, scope)
        self.bind(scope, node.name, node)

    do_AsyncFunctionDef = do_FunctionDef

    def do_Lambda(self, node: ast.Lambda, scope: _Scope) -> None:
        self.function(node, scope)

    def do_ClassDef(self, node: ast.ClassDef, scope: _Scope) -> None:
        self.walk([*node.decorator_list, *node.bases, *node.keywords], scope)
        self.walk(node.body, _Scope("class", scope))
        self.bind(scope, node.name, node)

    def comprehension(self, node: ast.AST, scope: _Scope, results: list[ast.expr]) -> None:
        inner = _Scope("comprehension", scope)
        for k, gen in enumerate(node.generators):  # type: ignore[attr-defined]
            self.walk(gen.iter, scope if k == 0 else inner)  # the first iterable runs outside
            self.walk(gen.target, inner)
            self.walk(gen.ifs, inner)
        self.walk(results, inner)

    def do_ListComp(self, node: ast.ListComp, scope: _Scope) -> None:
        self.comprehension(node, scope, [node.elt])

    do_SetComp = do_GeneratorExp = do_ListComp

    def do_DictComp(self, node: ast.DictComp, scope: _Scope) -> None:
        self.comprehension(node, scope, [node.key, node.value])

    def do_Name(self, node: ast.Name, scope: _Scope) -> None:
        if isinstance(node.ctx, ast.Store):
            self.bind(scope, node.id, node)
        else:
            self.use(scope, node.id, node)

    def do_Assign(self, node: ast.Assign, scope: _Scope) -> None:
        self.walk(node.value, scope)
        self.walk(node.targets, scope)

    def do_AugAssign(self, node: ast.AugAssign, scope: _Scope) -> None:
        self.walk(node.value, scope)
        if isinstance(node.target, ast.Name):
            self.use(scope, node.target.id, node.target)
        self.walk(node.target, scope)

    def do_AnnAssign(self, node: ast.AnnAssign, scope: _Scope) -> None:
        self.walk(node.annotation, scope)
        if node.value is not None:  # `x: int` alone binds nothing
            self.walk(node.value, scope)
            self.walk(node.target, scope)

    def do_NamedExpr(self, node: ast.NamedExpr, scope: _Scope) -> None:
        self.walk(node.value, scope)
        while scope.kind == "comprehension" and scope.parent is not None:
            scope = scope.parent
        self.walk(node.target, scope)

    def do_For(self, node: ast.For, scope: _Scope) -> None:
        self.walk(node.iter, scope)
        self.walk(node.target, scope)
        self.walk([*node.body, *node.orelse], scope)

    do_AsyncFor = do_For

    def do_Global(self, node: ast.Global, scope: _Scope) -> None:
        scope.globals.update(node.names)

    def do_Nonlocal(self, node: ast.Nonlocal, scope: _Scope) -> None:
        scope.nonlocals.update(node.names)

    def do_ExceptHandler(self, node: ast.ExceptHandler, scope: _Scope) -> None:
        self.walk(node.type, scope)
        if node.name:
            self.bind(scope, node.name, node)
        self.walk(node.body, scope)

    def do_alias(self, node: ast.alias, scope: _Scope) -> None:
        if node.name != "*":
            self.bind(scope, node.asname or node.name.split(".")[0], node)

    def do_MatchAs(self, node: ast.MatchAs, scope: _Scope) -> None:
        self.walk(node.pattern, scope)
        if node.name:
            self.bind(scope, node.name, node)

    def do_MatchStar(self, node: ast.MatchStar, scope: _Scope) -> None:
        if node.name:
            self.bind(scope, node.name, node)

    def do_MatchMapping(self, node: ast.MatchMapping, scope: _Scope) -> None:
        self.walk([*node.keys, *node.patterns], scope)
        if node.rest:
            self.bind(scope, node.rest, node)


def function_graph(fn: ast.FunctionDef | ast.AsyncFunctionDef, module: str = "") -> CodeGraph:
    """The graph of one function (nodes, parent/sibling/data-flow edges; the module docstring
    gives the rules)."""
    b = _Builder(fn)
    b.visit(fn, None)
    flow = _DataFlow(b.index).run(fn)
    return CodeGraph(fn.name, module, fn.lineno, b.tokens, b.child_edges, b.sibling_edges, flow)


def iter_functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every def and async def in `tree`, in source order."""
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    yield from sorted(fns, key=lambda n: (n.lineno, n.col_offset))


def source_graphs(source: str | bytes, module: str = "<string>") -> list[CodeGraph]:
    """The graphs of every function in a source file (outer before inner, in source order),
    skipping functions whose name has no subtoken. Raises SyntaxError for code that does not
    parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like in old code
        tree = ast.parse(source, filename=module)
    return [function_graph(fn, module) for fn in iter_functions(tree) if split_subtokens(fn.name)]


@dataclass
class CodeCorpus:
    """Every function graph read from a folder, and what was skipped."""

    root: str
    graphs: list[CodeGraph]
    files: int
    failed: list[str]  # modules that did not parse


def parse_folder(root: Path) -> CodeCorpus:
    """Parse every Python file under `root` into function graphs (files that do not parse, or
    are not UTF-8, are listed in `failed`)."""
    graphs, failed = [], []
    files = python_files(root)
    for module, path in files:
        try:
            graphs += source_graphs(path.read_bytes(), module)
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            failed.append(module)
    return CodeCorpus(str(root), graphs, len(files), failed)


def _fingerprint(root: Path, files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{sys.version_info[:2]}|{Path(root).resolve()}".encode())
    for module, path in files:
        st = path.stat()
        h.update(f"|{module}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *sizes]).cumsum(0)


def _to_tensors(c: CodeCorpus) -> dict:
    table: dict[str, int] = {}
    tokens = [table.setdefault(t, len(table)) for g in c.graphs for t in g.tokens]
    edges = [(s, d, k) for g in c.graphs for k, es in enumerate((g.child_edges, g.sibling_edges, g.flow_edges)) for s, d in es]
    return {
        "version": CACHE_VERSION, "root": c.root, "files": c.files, "failed": c.failed, "table": list(table),
        "names": [g.name for g in c.graphs], "modules": [g.module for g in c.graphs],
        "linenos": torch.tensor([g.lineno for g in c.graphs]),
        "tokens": torch.tensor(tokens, dtype=torch.int32), "node_offsets": _offsets([g.num_nodes for g in c.graphs]),
        "edges": torch.tensor(edges, dtype=torch.int32).reshape(-1, 3),
        "edge_offsets": _offsets([len(g.edges()) for g in c.graphs]),
    }


def _from_tensors(d: dict) -> CodeCorpus:
    table = [sys.intern(t) for t in d["table"]]
    tokens, nodes, edges, eoff = d["tokens"].tolist(), d["node_offsets"].tolist(), d["edges"].tolist(), d["edge_offsets"].tolist()
    graphs = []
    for i, (name, module, line) in enumerate(zip(d["names"], d["modules"], d["linenos"].tolist())):
        kinds: list[list[tuple[int, int]]] = [[], [], []]
        for s, t, k in edges[eoff[i] : eoff[i + 1]]:
            kinds[k].append((s, t))
        graphs.append(CodeGraph(name, module, line, [table[t] for t in tokens[nodes[i] : nodes[i + 1]]], *kinds))
    return CodeCorpus(d["root"], graphs, d["files"], d["failed"])


def load_code_corpus(root: str | Path | None = None, cache_dir: str | Path | None = None, *, verbose: bool = False) -> CodeCorpus:
    """The function graphs of every Python file under `root` (default: the standard library),
    cached in `cache_dir` (default: the data cache) under a hash of the file list, sizes and
    modification times, so an unchanged folder is parsed once."""
    from .tokens import default_cache_dir

    root = Path(root).expanduser() if root is not None else stdlib_root()
    files = python_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {str(root)!r} (folders named {', '.join(SKIP_DIRS)} are skipped)")
    cache = Path(cache_dir or default_cache_dir()).expanduser() / f"code-graphs-{_fingerprint(root, files)}.pt"
    if cache.is_file():
        return _from_tensors(torch.load(cache, weights_only=True))
    start = time.perf_counter()
    corpus = parse_folder(root)
    if verbose:
        print(f"parsed {corpus.files} files under {root} into {len(corpus.graphs):,} function graphs in "
              f"{time.perf_counter() - start:.1f}s; cached in {cache}", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{id(corpus)}")
    torch.save(_to_tensors(corpus), tmp)
    tmp.replace(cache)
    return corpus

