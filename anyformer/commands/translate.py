"""`anyformer translate RUN "TEXT"`: a sequence_to_sequence run's beam-search translation of a
text (or of every line of standard input with "-")."""

from __future__ import annotations

import argparse

from ._args import at_least
from ._predict import load_served_run, print_predictions, task_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `translate` subcommand."""
    p = subparsers.add_parser("translate", help="translate a text with a sequence_to_sequence (encoder-decoder) run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task sequence_to_sequence")
    p.add_argument("text", help='the text to translate; "-" reads one text per line from standard input')
    p.add_argument("--beams", type=at_least(1), default=None, help="beam width (default: the task's beams option; 1 = greedy)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=None, help="longest translation in tokens (default: the task's max_target_tokens)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one translation per input text (the sequence-to-sequence task's predictions)."""
    r, task = load_served_run(args.run_dir, args.checkpoint, args.device, "translate")
    settings = task_settings(task, {"beams": args.beams, "max_new_tokens": args.max_new_tokens}, flag=True)
    return print_predictions(r, task, [args.text], settings)
