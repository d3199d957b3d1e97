"""`anyformer export RUN DST`: a run (sharded FSDP checkpoints or not) -> a run folder with
ordinary single-file checkpoints."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="copy a run with single-file checkpoints (turns an FSDP run's sharded checkpoints into ordinary ones)",
        description="Read the best and the latest checkpoint of RUN (sharded checkpoints of a train.parallel=fsdp "
        "run are read whole, in this one process) and write DST as a run folder with model.safetensors "
        "checkpoints: it resumes in one process or under DDP, and eval, generate, convert (Hugging Face "
        "layout) and from_pretrained read it like any run.",
    )
    p.add_argument("run", help="run folder written by `anyformer train`")
    p.add_argument("dst", help="new folder for the copy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and say where the files went."""
    from ..training.checkpoint import export_run

    written = export_run(args.run, args.dst)
    for folder in written:
        print(f"wrote {folder}")
    print(f"next: anyformer eval {args.dst} | anyformer convert {args.dst} HF_DIR (architectures with a Hugging Face layout)")
    return 0
