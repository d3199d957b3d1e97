"""`anyformer name-function RUN FILE.py`: a method-naming run's predicted name for every
function in a Python file, beside the true name."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `name-function` subcommand."""
    p = subparsers.add_parser("name-function", help="predict the names of the functions in a Python file from a method_naming run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task method_naming")
    p.add_argument("file", help="a Python source file; every def and async def in it is named (nested ones too)")
    p.add_argument("--top", type=int, default=3, help="also show the next most likely subtokens, up to this many in all (default 3)")
    p.add_argument("--skip-large", action="store_true", help="skip functions over the model's node limit instead of stopping")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print, per function: its line, true name, the predicted name and subtoken probabilities."""
    from pathlib import Path

    import torch

    from ..data.code_graphs import source_graphs
    from ..tasks import TASKS
    from ..tasks.method_naming import collate, predicted_sets, subtoken_scores, to_example
    from ..tokenizers.code_graph import CodeGraphVocab
    from ..training.run import autocast_dtype, load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if r.cfg.task.kind != "method_naming" or not isinstance(r.tokenizer, CodeGraphVocab):
        raise ValueError(f"{args.run_dir} was trained for task {r.cfg.task.kind!r}; name-function needs a method_naming run")
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"no Python file at {str(path)!r}")
    try:
        graphs = source_graphs(path.read_bytes(), path.name)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{path} does not parse as Python: {e}") from None
    if not graphs:
        raise ValueError(f"{path} has no functions (def or async def) with a name to predict; nothing to name")
    limit = r.cfg.model.max_seq_len
    large = [g for g in graphs if g.num_nodes > limit]
    if large and not args.skip_large:
        listed = ", ".join(f"{g.name} (line {g.lineno}, {g.num_nodes} nodes)" for g in large[:5])
        raise ValueError(f"{len(large)} function(s) exceed the model's limit of {limit} nodes (model.max_seq_len): {listed}; "
                         "split them, or pass --skip-large to name the others")
    task = TASKS.get("method_naming")(r.cfg)
    vocab = r.tokenizer
    device = next(r.model.parameters()).device
    f1s = []
    for g in graphs:
        if g.num_nodes > limit:
            print(f"line {g.lineno:<5} {g.name:<28} skipped: {g.num_nodes} nodes > {limit}")
            continue
        batch = tuple(a.to(device) for a in collate([to_example(g, vocab)], len(vocab.names)))
        with torch.no_grad():
            logits = task.logits(r.model, batch, autocast_dtype(r.cfg), vocab)[0]
        probs = logits.sigmoid()
        predicted = predicted_sets(logits[None], vocab.names)[0]
        f1s.append(subtoken_scores(g.target, predicted)[2])
        shown = probs.argsort(descending=True)[: max(args.top, len(predicted))].tolist()
        detail = " ".join(f"{vocab.names[i]}:{float(probs[i]):.2f}" for i in shown)
        print(f"line {g.lineno:<5} {g.name:<28} -> {'_'.join(predicted):<24} ({detail})")
    if f1s:
        print(f"{len(f1s)} functions named; mean subtoken F1 {sum(f1s) / len(f1s):.3f}")
    return 0
