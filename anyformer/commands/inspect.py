"""`anyformer inspect attention RUN --prompt "..."`: the attention maps of every layer and head
of a trained run for one input, as a PNG grid, with each head's entropy and mean distance."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand (with its `attention` view)."""
    p = subparsers.add_parser("inspect", help="look inside a trained run (attention maps)")
    views = p.add_subparsers(dest="view", required=True)
    a = views.add_parser("attention", help="attention maps of every layer and head for a prompt (or an image for a ViT run)")
    a.add_argument("run_dir", help="a folder written by `anyformer train`")
    a.add_argument("--prompt", help="the text whose attention is shown (text runs)")
    a.add_argument("--image", help="the image file whose attention is shown (ViT runs)")
    a.add_argument("--out", help="PNG to write (default RUN/attention.png)")
    a.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the grid and print the per-head statistics."""
    from pathlib import Path

    from ..tasks import TASKS
    from ..training.inspect import attention_maps, head_statistics, plot_attention_grid
    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if (args.prompt is None) == (args.image is None):
        raise ValueError('give the input to look at: --prompt "TEXT" for a text run, or --image FILE for an image run (one of them)')
    task = TASKS.get(r.cfg.task.kind)(r.cfg)
    inputs, labels = task.inspect_input(args.prompt if args.image is None else args.image, r.tokenizer)
    inputs = inputs.to(next(r.model.parameters()).device)
    maps = attention_maps(r.model, inputs)
    out = Path(args.out) if args.out else r.checkpoint.parent.parent / "attention.png"
    plot_attention_grid(maps, out, labels, f"{args.run_dir} ({r.cfg.model.attention.kind} attention)")
    entropy, distance = head_statistics(maps)
    print(f"{len(maps)} layers x {entropy.shape[1]} heads, {maps[0].shape[-1]} tokens; grid written to {out}")
    print("layer  head  entropy (nats)  mean distance (tokens)")
    for i in range(entropy.shape[0]):
        for j in range(entropy.shape[1]):
            print(f"{i:>5}  {j:>4}  {float(entropy[i, j]):>14.3f}  {float(distance[i, j]):>22.2f}")
    return 0
