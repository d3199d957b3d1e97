"""Method naming on code graphs: the graph builder against an independent walk of the AST,
the data-flow rule, the name never in its own input, graph-restricted attention is local
(a node's output moves only when a node within num_layers hops changes), code2's F1, exact
resume, clear errors."""

from __future__ import annotations

import ast
import shutil
import textwrap
from collections import Counter, deque
from pathlib import Path

import pytest
import torch

from anyformer.config import ConfigError, apply_overrides
from anyformer.data.code_graphs import FN_TOKEN, source_graphs, split_subtokens, stdlib_root
from anyformer.tasks.method_naming import collate, graph_attention, predicted_sets, subtoken_scores, to_example
from anyformer.tokenizers.code_graph import CodeGraphVocab
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.training_helpers import interrupted_copy

FILES = ["textwrap.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py", "json/decoder.py",
         "json/encoder.py", "string.py", "glob.py", "genericpath.py", "posixpath.py", "getopt.py", "netrc.py", "quopri.py"]

FLOW_EXAMPLE = textwrap.dedent("""\
    def f(a, b):
        x = a + 1
        for i in range(b):
            x += i
        y = [x * k for k in range(3)]
        def g():
            return x + a
        import os as o
        with open(a) as fh:
            z = fh.read()
        try:
            pass
        except ValueError as err:
            print(err)
        return y, z, g, o, x
    """)

# every scoping and ordering rule the first example does not reach: an assignment that reads
# the name it writes, a tuple swap, global, nonlocal, a walrus outside and inside a
# comprehension, a comprehension's first iterable read outside it, a closure writing through nonlocal
SCOPES_EXAMPLE = textwrap.dedent("""\
    def h(n, a, b):
        n = n + 1
        a, b = b, a
        global counter
        counter = n
        total = 0
        def inner():
            nonlocal total
            total += a
            return counter
        if (m := n * 2) > 3:
            b = m
        squares = [k * m for k in range(b) if (last := k)]
        return squares, last, total, inner, b
    """)

RECURSION_EXAMPLE = textwrap.dedent("""\
    class A:
        def fib(self, n):
            if n < 2:
                return n
            return self.fib(n - 1) + fib(n - 2) + _fib(n) + FIB + fibonacci(n)
    """)


def code_folder(tmp: Path) -> Path:
    """A few standard-library modules copied into `tmp/code` (their relative paths kept)."""
    root = tmp / "code"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_root() / name, root / name)
    return root


def naming_config(tmp: Path, *extra: str):
    return apply_overrides(default_run_config(), [
        "--task.kind=method_naming", "--data.corpus=python", f"--data.path={code_folder(tmp)}",
        f"--data.cache_dir={tmp / 'cache'}", "--data.val_fraction=0.3", "--task.options.name_min_count=1",
        "--task.options.min_count=1", "--task.options.bucket_size=32", "--model.arch=encoder", "--model.dim=32",
        "--model.num_layers=2", "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64", "--model.max_seq_len=128",
        "--model.positional.kind=magnetic", "--model.positional.options={q: 0.05, k: 4}", "--model.head.pooling=mean",
        "--train.batch_size=8", "--train.max_steps=8", "--train.max_minutes=null", "--train.warmup_steps=2",
        "--train.eval_every=4", "--train.log_every=2", "--train.dtype=float32", "--train.optimizer=adamw",
        "--train.samples=0", "--train.lr=3e-3", f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ])


# ----------------------------------------------------------------------------- an independent walk


def ast_preorder(fn: ast.AST) -> tuple[list[ast.AST], list[tuple[int, int]]]:
    """The AST nodes of `fn` in pre-order (expression contexts left out) and the (parent,
    child) pairs between their positions."""
    nodes: list[ast.AST] = []
    pairs: list[tuple[int, int]] = []

    def walk(node: ast.AST, parent: int | None) -> None:
        i = len(nodes)
        nodes.append(node)
        if parent is not None:
            pairs.append((parent, i))
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.expr_context):
                walk(child, i)

    walk(fn, None)
    return nodes, pairs


def is_identifier(token: str) -> bool:
    return token.startswith("$") or token == FN_TOKEN


def node_positions(graph, fn: ast.AST) -> dict[int, int]:
    """id(AST node) -> its node index in `graph`: the k-th non-identifier node is the k-th AST
    node of the pre-order walk."""
    nodes, _ = ast_preorder(fn)
    structural = [i for i, t in enumerate(graph.tokens) if not is_identifier(t)]
    assert len(structural) == len(nodes)
    return {id(n): i for n, i in zip(nodes, structural)}


def functions(source: str) -> list[ast.AST]:
    tree = ast.parse(source)
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and split_subtokens(n.name)]
    return sorted(fns, key=lambda n: (n.lineno, n.col_offset))


def test_graph_edges_match_the_ast() -> None:
    for name in ("textwrap.py", "json/decoder.py", "shlex.py"):
        source = (stdlib_root() / name).read_text(encoding="utf-8")
        graphs, fns = source_graphs(source, name), functions(source)
        assert [g.name for g in graphs] == [f.name for f in fns] and len(graphs) > 5
        for g, fn in zip(graphs, fns):
            nodes, pairs = ast_preorder(fn)
            structural = [i for i, t in enumerate(g.tokens) if not is_identifier(t)]
            for node, i in zip(nodes, structural):  # the node types, in pre-order
                want = "Constant" if isinstance(node, ast.Constant) else type(node).__name__
                assert g.tokens[i].split(":")[0] == want
            child = set(g.child_edges)
            for p, c in pairs:  # each parent -> child edge of the AST exists
                assert (structural[p], structural[c]) in child
            parents = {c: p for p, c in g.child_edges}
            assert len(parents) == len(g.child_edges) == g.num_nodes - 1  # a tree over every node but the root
            for i, t in enumerate(g.tokens):
                if is_identifier(t):  # identifier subtokens hang under an AST node
                    assert not is_identifier(g.tokens[parents[i]])
            kids: dict[int, list[int]] = {}
            for p, c in g.child_edges:
                kids.setdefault(p, []).append(c)
            want_siblings = {(a, b) for cs in kids.values() for a, b in zip(sorted(cs), sorted(cs)[1:])}
            assert set(g.sibling_edges) == want_siblings
            for node, i in zip(nodes, structural):  # a variable's subtokens, in order
                if isinstance(node, ast.Name) and split_subtokens(node.id) != split_subtokens(fn.name):
                    subs = [g.tokens[c] for c in sorted(kids.get(i, []))]
                    assert subs == ["$" + s for s in split_subtokens(node.id)] or (subs == ["$_"] and not split_subtokens(node.id))


def test_split_subtokens() -> None:
    assert split_subtokens("HTTPServer2_getValue") == ["http", "server", "2", "get", "value"]
    assert split_subtokens("__init__") == ["init"]
    assert split_subtokens("_") == []


def test_data_flow_rule_on_a_hand_written_function() -> None:
    (g,) = [g for g in source_graphs(FLOW_EXAMPLE) if g.name == "f"]
    fn = functions(FLOW_EXAMPLE)[0]
    pos = node_positions(g, fn)

    def at(kind: type, line: int, ident: str, nth: int = 0) -> int:
        found = [n for n in ast.walk(fn) if isinstance(n, kind) and n.lineno == line and ident in
                 (getattr(n, "id", None), getattr(n, "arg", None), getattr(n, "name", None), getattr(n, "asname", None))]
        return pos[id(sorted(found, key=lambda n: n.col_offset)[nth])]

    name = lambda line, ident, nth=0: at(ast.Name, line, ident, nth)  # noqa: E731
    a, b = at(ast.arg, 1, "a"), at(ast.arg, 1, "b")
    x2, x4, k_target = name(2, "x"), name(4, "x"), name(5, "k", 1)
    want = {
        (a, name(2, "a")), (b, name(3, "b")), (x2, x4), (name(3, "i"), name(4, "i")),
        (x2, name(5, "x")), (x4, name(5, "x")), (k_target, name(5, "k")),  # a comprehension reads the enclosing x
        (x2, name(7, "x")), (x4, name(7, "x")), (a, name(7, "a")),  # a closure reads every binding of x
        (a, name(9, "a")), (name(9, "fh"), name(10, "fh")), (at(ast.ExceptHandler, 13, "err"), name(14, "err")),
        (name(5, "y"), name(15, "y")), (name(10, "z"), name(15, "z")), (at(ast.FunctionDef, 6, "g"), name(15, "g")),
        (at(ast.alias, 8, "o"), name(15, "o")), (x2, name(15, "x")), (x4, name(15, "x")),
    }
    assert set(g.flow_edges) == want


def test_data_flow_rule_on_every_scoping_and_ordering_rule() -> None:
    (g,) = [g for g in source_graphs(SCOPES_EXAMPLE) if g.name == "h"]
    fn = functions(SCOPES_EXAMPLE)[0]
    pos = node_positions(g, fn)

    def name(line: int, ident: str, nth: int = 0) -> int:
        found = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and n.lineno == line and n.id == ident]
        return pos[id(sorted(found, key=lambda n: n.col_offset)[nth])]

    arg = {a.arg: pos[id(a)] for a in fn.args.args}
    inner = pos[id(next(n for n in ast.walk(fn) if isinstance(n, ast.FunctionDef) and n.name == "inner"))]
    # (nth by column: a target comes before the value it is assigned)
    n2, a3, b3, total6, total9, m11, b12 = name(2, "n", 0), name(3, "a", 0), name(3, "b", 0), name(6, "total"), name(9, "total"), \
        name(11, "m"), name(12, "b")
    k_elt, k_target, k_walrus = name(13, "k", 0), name(13, "k", 1), name(13, "k", 2)
    want = {
        (arg["n"], name(2, "n", 1)),  # n = n + 1 reads the argument, never its own target
        (arg["b"], name(3, "b", 1)), (arg["a"], name(3, "a", 1)),  # a, b = b, a: the old values
        (arg["n"], name(5, "n")), (n2, name(5, "n")),  # counter = n: counter is global, no binding
        (arg["a"], name(9, "a")), (a3, name(9, "a")),  # a closure reads every binding of a
        (total6, total9),  # nonlocal total: += reads h's total
        (arg["n"], name(11, "n")), (n2, name(11, "n")), (m11, name(12, "m")),  # the walrus binds m in h
        (arg["b"], name(13, "b")), (b3, name(13, "b")), (b12, name(13, "b")),  # the first iterable is read in h; no binding kills another
        (k_target, k_walrus), (k_target, k_elt), (m11, name(13, "m")),  # k is the comprehension's; m is h's
        (name(13, "squares"), name(14, "squares")), (name(13, "last"), name(14, "last")),  # last := k binds in h
        (total6, name(14, "total")), (total9, name(14, "total")),  # the closure's nonlocal write is a binding of h
        (inner, name(14, "inner")), (arg["b"], name(14, "b")), (b3, name(14, "b")), (b12, name(14, "b")),
    }
    assert set(g.flow_edges) == want, (sorted(set(g.flow_edges) - want), sorted(want - set(g.flow_edges)))


def test_the_name_never_appears_in_its_own_input(tmp_path) -> None:
    (fib,) = source_graphs(RECURSION_EXAMPLE)
    assert fib.target == ["fib"] and fib.tokens.count(FN_TOKEN) == 4  # self.fib, fib, _fib, FIB
    assert "$fib" not in fib.tokens and "$fibonacci" in fib.tokens
    for path in sorted(code_folder(tmp_path).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for g, fn in zip(source_graphs(source), functions(source)):
            own = split_subtokens(fn.name)
            same = sum(split_subtokens(part) == own for n in ast.walk(fn) for field, v in ast.iter_fields(n)
                       if not (n is fn and field == "name") and field not in ("type_comment", "kind")
                       and not isinstance(n, ast.Constant)
                       for s in (v if isinstance(v, list) else [v]) if isinstance(s, str) for part in s.split("."))
            assert g.tokens.count(FN_TOKEN) == same
            runs: dict[int, list[str]] = {}
            for p, c in g.child_edges:
                if g.tokens[c].startswith("$") and g.tokens[p] in ("Name", "Attribute", "arg", "FunctionDef", "ClassDef"):
                    runs.setdefault(p, []).append(g.tokens[c][1:])
            assert all(r != own for r in runs.values())


def test_graph_attention_is_local_to_num_layers_hops() -> None:
    from anyformer.models import build_model

    (g,) = [g for g in source_graphs(FLOW_EXAMPLE) if g.name == "f"]
    layers = 2
    cfg = apply_overrides(default_run_config(), ["--model.arch=encoder", "--model.dim=32", f"--model.num_layers={layers}",
                                                 "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64",
                                                 "--model.max_seq_len=128", "--model.vocab_size=64",
                                                 "--model.positional.kind=magnetic"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ex = to_example(g, CodeGraphVocab.fit(Counter(g.tokens), {"f": 1}, 2, min_count=1, name_min_count=1))
    tokens, keep, graph, _ = collate([ex], 1)
    n = g.num_nodes
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for u, v in g.edges():
        neighbours[u].add(v)
        neighbours[v].add(u)
    for source in (0, n // 2, n - 1):
        dist = {source: 0}
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v in neighbours[u] - dist.keys():
                dist[v] = dist[u] + 1
                queue.append(v)
        changed = tokens.clone()
        changed[0, source] = 1 if int(tokens[0, source]) != 1 else 2
        with torch.no_grad():
            before = model.hidden(tokens, keep, attn_mask=graph_attention(graph, keep), graph=graph)[0]
            after = model.hidden(changed, keep, attn_mask=graph_attention(graph, keep), graph=graph)[0]
        moved = (after - before).abs().amax(-1)
        near = [v for v in range(n) if dist.get(v, n) <= layers]
        far = [v for v in range(n) if dist.get(v, n) > layers]
        assert far and len(near) > 1
        assert float(moved[far].max()) == 0.0
        assert float(moved[near].min()) > 1e-5


def test_a_batch_gives_each_function_its_own_output() -> None:
    """Padding (to the largest graph of the batch) changes no function's logits, in any input
    form: it is masked out of attention and pooling, and isolated padding nodes take no slot of
    the magnetic encoding."""
    from anyformer.models import build_model
    from anyformer.tasks.method_naming import model_kwargs

    source = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8") + FLOW_EXAMPLE + RECURSION_EXAMPLE
    graphs = [g for g in source_graphs(source) if g.num_nodes <= 128][:6]
    vocab = CodeGraphVocab.fit(Counter(t for g in graphs for t in g.tokens), Counter(s for g in graphs for s in g.target),
                               len(graphs) + 1, min_count=1, name_min_count=1)
    examples = [to_example(g, vocab) for g in graphs]
    for form, positional in (("graph", "magnetic"), ("positions", "magnetic"), ("sequence", "rope")):
        cfg = apply_overrides(default_run_config(), [
            "--model.arch=encoder", "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2",
            "--model.ffn.hidden_dim=64", "--model.max_seq_len=128", f"--model.vocab_size={vocab.vocab_size}",
            f"--model.positional.kind={positional}", "--model.head.kind=sequence_classification", "--model.head.pooling=mean",
            f"--model.head.num_labels={len(vocab.names)}"]).model
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            tokens, keep, graph, _ = collate(examples, len(vocab.names))
            batched = model(tokens, keep, **model_kwargs(form, keep, graph))
            for i, e in enumerate(examples):
                tokens, keep, graph, _ = collate([e], len(vocab.names))
                torch.testing.assert_close(model(tokens, keep, **model_kwargs(form, keep, graph))[0], batched[i], atol=2e-5, rtol=1e-4)


def test_f1_and_the_prediction_rule() -> None:
    assert subtoken_scores(["get", "value"], ["get", "item", "x"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert subtoken_scores(["get"], ["set"]) == (0.0, 0.0, 0.0)
    assert subtoken_scores(["read", "line"], ["line", "read"]) == (1.0, 1.0, 1.0)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -1.0, -2.0]])
    assert predicted_sets(logits, ["a", "b", "c"]) == [["a", "c"], ["b"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[float]]:
    tmp = tmp_path_factory.mktemp("naming")
    result = Trainer(naming_config(tmp), run_dir=tmp / "full", verbose=False).fit()
    return tmp, result.losses


def test_trains_and_resumes_exactly(trained) -> None:
    tmp, losses = trained
    assert len(losses) == 8 and all(map(lambda v: v == v, losses))
    resumed = Trainer(naming_config(tmp), run_dir=interrupted_copy(tmp / "full", tmp / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(losses[4:], abs=1e-6)


def test_evaluation_and_baseline(trained) -> None:
    tmp, _ = trained
    trainer = Trainer(naming_config(tmp), run_dir=tmp / "eval", verbose=False)
    data = trainer.data
    assert {e.module for e in data.train}.isdisjoint({e.module for e in data.val})  # whole files held out
    assert all(e.num_nodes <= 128 for e in data.train + data.val) and data.dropped > 0
    scores = trainer.task.evaluate(trainer.model, data, trainer.env)
    base = [subtoken_scores(e.target, data.baseline) for e in data.val]
    assert scores["baseline_f1"] == pytest.approx(sum(s[2] for s in base) / len(base))
    assert 0.0 <= scores["f1"] <= 1.0 and scores["val_loss"] > 0
    seq = Trainer(naming_config(tmp, "--task.options.input=sequence", "--model.positional.kind=rope",
                                "--model.positional.options={}", "--train.max_steps=2"), run_dir=tmp / "seq", verbose=False)
    assert len(seq.fit().losses) == 2
    full = Trainer(naming_config(tmp, "--task.options.input=positions", "--train.max_steps=2"), run_dir=tmp / "pos", verbose=False)
    assert len(full.fit().losses) == 2


def test_name_function_command(trained, tmp_path, capsys) -> None:
    from anyformer.cli import main

    tmp, _ = trained
    run = tmp / "full"
    code = tmp_path / "m.py"
    code.write_text(FLOW_EXAMPLE + RECURSION_EXAMPLE)
    assert main(["name-function", str(run), str(code)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out[:-1]] == ["f", "g", "fib"] and "mean subtoken F1" in out[-1]
    bad = {"nofn.py": "x = 1\n", "broken.py": "def f(:\n", "big.py": "def big():\n" + "    x = 1\n" * 40}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name, message in (("nofn.py", "has no functions"), ("broken.py", "does not parse"), ("big.py", "exceed the model's limit of 128 nodes"),
                          ("missing.py", "no Python file")):
        assert main(["name-function", str(run), str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("kind: method_naming", "kind: masked_lm"))
    assert main(["name-function", str(other), str(code)]) == 2
    assert "needs a method_naming run" in capsys.readouterr().err


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="trains model.arch 'encoder'"):
        naming_config(tmp_path, "--model.arch=decoder").validate()
    with pytest.raises(ConfigError, match="data.corpus to 'stdlib'"):
        naming_config(tmp_path, "--data.corpus=shakespeare").validate()
    with pytest.raises(ConfigError, match="set data.corpus=python to read the code there"):
        naming_config(tmp_path, "--data.corpus=stdlib").validate()
    with pytest.raises(ConfigError, match="set data.path"):
        naming_config(tmp_path, "--data.path=null").validate()
    with pytest.raises(ConfigError, match="input=sequence gives the model no graph"):
        naming_config(tmp_path, "--task.options.input=sequence").validate()
    with pytest.raises(ConfigError, match="input=positions gives the graph to the positional encoding only"):
        naming_config(tmp_path, "--task.options.input=positions", "--model.positional.kind=rope").validate()
    with pytest.raises(ConfigError, match="input"):
        naming_config(tmp_path, "--task.options.input=tree").validate()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "consts.py").write_text("A = 1\n")
    with pytest.raises(ValueError, match="no functions"):
        Trainer(naming_config(tmp_path, f"--data.path={empty}"), run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(FileNotFoundError, match="no folder or file of Python code"):
        Trainer(naming_config(tmp_path, f"--data.path={tmp_path / 'nowhere'}"), run_dir=tmp_path / "r2", verbose=False)
    (tmp_path / "no_code").mkdir()
    with pytest.raises(FileNotFoundError, match="no .py files"):
        Trainer(naming_config(tmp_path, f"--data.path={tmp_path / 'no_code'}"), run_dir=tmp_path / "r3", verbose=False)


def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    """Both processes draw the same global batch and take their halves; the evaluation sums
    over processes: two processes give the losses and metrics of one."""
    from tests.training_helpers import check_ddp_matches_one_process

    cfg = naming_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4")
    check_ddp_matches_one_process(cfg, tmp_path, ("val_loss", "f1", "precision", "recall", "baseline_f1"))
