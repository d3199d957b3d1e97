"""`anyformer predict RUN INPUT...`: the predictions of any run whose task makes them (labels of
a text, image or point cloud; a translation; masked residues; a function's name; a
continuation), printed as the task prints them. `--set NAME=VALUE` changes one of the task's
prediction settings (`--list-settings` shows them). The commands named for a task (classify,
translate, fill-mask, name-function) are this command with that task's flags."""

from __future__ import annotations

import argparse

from ._predict import load_predicting_run, print_predictions, task_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` subcommand."""
    p = subparsers.add_parser("predict", help="the predictions of a trained run for inputs of its task (text, image, file)")
    p.add_argument("run_dir", help="a folder written by `anyformer train`")
    p.add_argument("inputs", nargs="*", help="what the run's task reads (see --list-settings); \"-\" reads one input per line of standard input")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a prediction setting of the task; repeatable")
    p.add_argument("--list-settings", action="store_true", help="print what the task reads and its settings, then stop")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the task's answer to each input."""
    r, task = load_predicting_run(args.run_dir, args.checkpoint, args.device)
    if args.list_settings:
        print(f"task {r.cfg.task.kind}: each input is {task.predict_input}")
        for name, s in task.predict_settings.items():
            print(f"  --set {name}=...  {s.help} (default {s.default!r})")
        return 0
    if not args.inputs:
        raise ValueError(f"give one or more inputs: task {r.cfg.task.kind!r} reads {task.predict_input}")
    given = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--set {item!r} must look like NAME=VALUE (the task's settings: --list-settings)")
        given[name] = value
    return print_predictions(r, task, args.inputs, task_settings(task, given))
