"""The package's import graph: no cycles, layers that only point down (every import statement,
those inside functions too), and generation reaches models only through the protocol
(anyformer.protocol), never through model or layer modules."""

from __future__ import annotations

import ast
from pathlib import Path

import anyformer

ROOT = Path(anyformer.__file__).parent


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> modules of the package it imports (every import statement, also those inside
    functions or TYPE_CHECKING blocks; `from pkg import name` counts `pkg.name` when that is a
    module, else `pkg`)."""
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{name}.{alias.name}" if f"{name}.{alias.name}" in mods else name
                    if target in mods and target != mod:
                        graph[mod].add(target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != mod:
                        graph[mod].add(alias.name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_generation_does_not_import_model_internals() -> None:
    graph = import_graph()
    bad = {
        (mod, dep)
        for mod, deps in graph.items()
        if mod.startswith("anyformer.generation")
        for dep in deps
        if dep.startswith(("anyformer.models", "anyformer.nn", "anyformer.convert", "anyformer.training"))
    }
    assert not bad, f"generation modules importing model internals: {sorted(bad)}"


# The layers, ground floor first. A module may import modules of its own top-level unit and of
# lower layers only; a unit of the package that is not listed here fails the test, so a new
# package is placed deliberately.
LAYERS: list[set[str]] = [
    {"registry", "config", "protocol", "native", "dtypes", "distributed", "files"},  # the ground floor
    {"plugins"},  # imports the user's modules (which may import anything) when asked
    {"nn", "tokenizers", "generation"},
    {"models", "data", "longcontext", "bench"},
    {"convert"},
    {"tasks"},
    {"training"},
    {"pretrained"},
    {"commands"},
    {"cli"},
    {"__main__", ""},  # "" is the package's own __init__: the public facade
]


def unit(module: str) -> str:
    """The top-level unit of `anyformer.a.b` ("a"; "" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Each import of a module in a higher (or the same, other) layer, as 'a -> b (layer i -> j)';
    units missing from `layers` are reported too."""
    level = {name: i for i, names in enumerate(layers) for name in names}
    out = sorted({f"{unit(m)!r} is in no layer" for m in graph if unit(m) not in level})
    for mod, deps in graph.items():
        for dep in deps:
            a, b = unit(mod), unit(dep)
            if a != b and a in level and b in level and level[b] >= level[a]:
                out.append(f"{mod} -> {dep} (layer {level[a]} -> {level[b]})")
    return sorted(out)


def test_layer_check_finds_planted_upward_imports() -> None:
    layers = [{"config"}, {"nn"}, {"tasks", "data"}, {"training"}]
    graph = {"anyformer.tasks.a": {"anyformer.training.t", "anyformer.nn.x", "anyformer.tasks.b"},
             "anyformer.tasks.b": {"anyformer.data.d"}, "anyformer.training.t": {"anyformer.tasks.a"},
             "anyformer.nn.x": {"anyformer.config"}, "anyformer.config": set(), "anyformer.data.d": set(),
             "anyformer.extra.e": set()}
    assert upward_imports(graph, layers) == [
        "'extra' is in no layer",
        "anyformer.tasks.a -> anyformer.training.t (layer 2 -> 3)",
        "anyformer.tasks.b -> anyformer.data.d (layer 2 -> 2)",
    ]


def test_imports_point_down_the_layers() -> None:
    bad = upward_imports(import_graph(), LAYERS)
    assert not bad, "imports against the layer order (tests/test_imports.py LAYERS):\n" + "\n".join(bad)
