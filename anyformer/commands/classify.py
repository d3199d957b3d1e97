"""`anyformer classify RUN "TEXT"`: a sequence-classification run's label probabilities for a text."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` subcommand."""
    p = subparsers.add_parser("classify", help="label probabilities of a text from a sequence_classification run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task sequence_classification")
    p.add_argument("text", help="the text to classify (its first train.seq_len - 1 bytes are read)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every label with its probability, most likely first."""
    import torch

    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if r.cfg.task.kind != "sequence_classification":
        raise ValueError(f"{args.run_dir} was trained for task {r.cfg.task.kind!r}; classify needs a sequence_classification run")
    if not args.text:
        raise ValueError("the text is empty; give the passage to classify")
    from ..tasks import TASKS

    labels = TASKS.get("sequence_classification")(r.cfg).options.labels  # type: ignore[attr-defined]
    ids = r.tokenizer.encode(args.text)[: r.cfg.train.seq_len - 1]
    cls_id = r.tokenizer.vocab_size  # the id after the bytes (the task's <cls>)
    device = next(r.model.parameters()).device
    with torch.no_grad():
        probs = r.model(torch.tensor([[cls_id, *ids]], device=device)).float().softmax(-1)[0]
    for i in probs.argsort(descending=True).tolist():
        print(f"{labels[i]:<12} {float(probs[i]):.3f}")
    return 0
