"""`anyformer inspect attention RUN --prompt "..."`: the attention maps of every layer and head
of a trained run for one input, as a PNG grid, with each head's entropy and mean distance."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand (with its `attention` view)."""
    p = subparsers.add_parser("inspect", help="look inside a trained run (attention maps)")
    views = p.add_subparsers(dest="view", required=True)
    a = views.add_parser("attention", help="attention maps of every layer and head for a prompt (or an image for a ViT run)")
    a.add_argument("run_dir", help="a folder written by `anyformer train` (decoder, encoder or vit)")
    a.add_argument("--prompt", help="the text whose attention is shown (text runs)")
    a.add_argument("--image", help="the image file whose attention is shown (ViT runs)")
    a.add_argument("--out", help="PNG to write (default RUN/attention.png)")
    a.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the grid and print the per-head statistics."""
    from pathlib import Path

    import torch

    from ..training.inspect import attention_maps, head_statistics, plot_attention_grid
    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    arch = r.cfg.model.arch
    device = next(r.model.parameters()).device
    labels = None
    if arch == "vit":
        if not args.image:
            raise ValueError("a ViT run shows the attention of an image: give --image FILE")
        from ..tasks.image_classification import read_image, to_model_input

        inputs = to_model_input(read_image(args.image, r.cfg.model.arch_options.image_size)[None]).to(device)
    elif arch in ("decoder", "encoder"):
        if not args.prompt:
            raise ValueError('give the text to look at with --prompt "..."')
        ids = r.tokenizer.encode(args.prompt)  # type: ignore[union-attr]
        if r.cfg.task.kind in ("sequence_classification",):
            ids = [r.tokenizer.vocab_size, *ids]  # type: ignore[union-attr]  # the task's <cls> first
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) > r.cfg.model.max_seq_len:
            raise ValueError(f"the prompt is {len(ids)} tokens; this model reads at most {r.cfg.model.max_seq_len}")
        inputs = torch.tensor([ids], device=device)
        if len(ids) <= 24:
            labels = []
            for i in ids:
                try:
                    labels.append(repr(r.tokenizer.decode([i]))[1:-1] or "·")  # type: ignore[union-attr]
                except Exception:  # an id outside the text vocabulary (a task's special token)
                    labels.append(f"<{i}>")
    else:
        raise ValueError(f"inspect attention reads decoder, encoder and vit runs; {args.run_dir} is model.arch={arch!r}")
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
