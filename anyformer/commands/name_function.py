"""`anyformer name-function RUN FILE.py`: a method-naming run's predicted name for every
function in a Python file, beside the true name."""

from __future__ import annotations

import argparse

from ._args import at_least
from ._predict import load_served_run, print_predictions, task_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `name-function` subcommand."""
    p = subparsers.add_parser("name-function", help="predict the names of the functions in a Python file from a method_naming run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task method_naming")
    p.add_argument("file", help="a Python source file; every def and async def in it is named (nested ones too)")
    p.add_argument("--top", type=at_least(1), default=3, help="also show the next most likely subtokens, up to this many in all (default 3)")
    p.add_argument("--skip-large", action="store_true", help="skip functions over the model's node limit instead of stopping")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print, per function: its line, true name, the predicted name and subtoken probabilities
    (the method-naming task's predictions)."""
    r, task = load_served_run(args.run_dir, args.checkpoint, args.device, "name-function")
    settings = task_settings(task, {"top": args.top, "skip_large": args.skip_large or None}, flag=True)
    return print_predictions(r, task, [args.file], settings)
