"""`anyformer fill-mask RUN "SEQUENCE"`: a masked language model's predictions for the <mask>
positions of a sequence (a protein run: residue letters with <mask> where unknown)."""

from __future__ import annotations

import argparse

from ._args import at_least
from ._predict import load_served_run, print_predictions, task_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `fill-mask` subcommand."""
    p = subparsers.add_parser("fill-mask", help="predict the <mask> positions of a sequence with a masked LM run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task masked_lm")
    p.add_argument("sequence", help='residues with <mask> where a prediction is wanted, e.g. "MKT<mask>AYIAKQR"')
    p.add_argument("--top", type=at_least(1), default=5, help="predictions shown per position (default 5)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print, per <mask>, the most likely tokens and their probabilities, then the sequence
    with every <mask> filled by its most likely residue (the masked-LM task's predictions)."""
    r, task = load_served_run(args.run_dir, args.checkpoint, args.device, "fill-mask")
    return print_predictions(r, task, [args.sequence], task_settings(task, {"top": args.top}, flag=True))
