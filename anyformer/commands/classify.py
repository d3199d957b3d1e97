"""`anyformer classify RUN INPUT`: a classification run's label probabilities for its input (a
text, an image file, a point or mesh file: what the run's task reads), most likely first; the
`predict` command with the classifiers' flags."""

from __future__ import annotations

import argparse

from ._predict import load_served_run, print_predictions, task_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` subcommand."""
    p = subparsers.add_parser("classify", help="label probabilities of a text, an image or a point cloud from a classification run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with a classification task (sequence, image, point cloud)")
    p.add_argument("input", help="the text to classify (its first train.seq_len - 1 bytes are read), or for an image "
                                 "run the path of an image file (PNG, JPEG, ...; made grayscale and resized to the run's size), "
                                 "or for a point-cloud run a point file (.xyz, .npy) or mesh file (.obj, .stl, .ply, .off, ...)")
    p.add_argument("--invert", action="store_true", help="image runs: invert the gray levels first (the data sets have "
                                                          "bright ink on black; use this for dark ink on white paper)")
    p.add_argument("--top", type=int, default=None, help="print only the most likely N labels")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every label with its probability, most likely first."""
    r, task = load_served_run(args.run_dir, args.checkpoint, args.device, "classify")
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    settings = task_settings(task, {"top": args.top, "invert": args.invert or None}, flag=True)
    return print_predictions(r, task, [args.input], settings)
