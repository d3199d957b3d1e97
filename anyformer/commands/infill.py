"""`anyformer infill RUN "LEFT" "RIGHT" --length N`: fill a gap of N tokens between two texts
with a masked-diffusion run (task masked_diffusion); the given texts are never changed."""

from __future__ import annotations

import argparse
import sys
import time

from ._diffusion import StepPrinter, add_diffusion_arguments, diffusion_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `infill` subcommand."""
    p = subparsers.add_parser("infill", help="fill a gap between two texts with a masked-diffusion run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task masked_diffusion")
    p.add_argument("left", help="the text before the gap (may be empty)")
    p.add_argument("right", help="the text after the gap (may be empty)")
    p.add_argument("--length", type=int, required=True, help="tokens (characters for a char-level run) in the gap")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = the most likely token at each drafted position")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 or unset = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mark", action="store_true", help="show the filled gap between [[ and ]]")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    add_diffusion_arguments(p, generate=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the left text, the filled gap and the right text."""
    import torch

    from ..generation.diffusion import diffusion_fill
    from ._predict import load_served_run

    if args.length < 1:
        raise ValueError(f"--length must be at least 1 token, got {args.length}")
    r, _ = load_served_run(args.run_dir, args.checkpoint, args.device, "infill",
                           " (a left-to-right decoder cannot condition on the text after the gap)")
    tok, context = r.tokenizer, r.cfg.model.max_seq_len
    try:
        left, right = tok.encode(args.left), tok.encode(args.right)  # type: ignore[union-attr]
    except ValueError as e:
        raise ValueError(f"the text cannot be encoded by this run's tokenizer: {e}") from None
    total = len(left) + args.length + len(right)
    if total > context:
        raise ValueError(f"left ({len(left)}) + --length ({args.length}) + right ({len(right)}) = {total} tokens, more than the "
                         f"model's context of {context}; shorten the texts or the gap")
    config = diffusion_config(args, args.length)
    mask_id = tok.vocab_size  # type: ignore[union-attr]
    device = next(r.model.parameters()).device
    ids = torch.tensor([left + [mask_id] * args.length + right], device=device)
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, len(left) : len(left) + args.length] = True
    printer = StepPrinter(tok, bool(args.show_steps))
    start = time.perf_counter()
    filled = diffusion_fill(r.model, ids, fill, mask_id, config, on_step=printer)
    took = time.perf_counter() - start
    gap = tok.decode(filled[0, len(left) : len(left) + args.length].tolist())  # type: ignore[union-attr]
    print(args.left + (f"[[{gap}]]" if args.mark else gap) + args.right)
    print(f"[{args.length} tokens filled in {took:.1f} s, {config.steps} steps, order {config.order}"
          f"{f', {printer.edits} drafts redrawn' if config.edit else ''}]", file=sys.stderr)
    return 0
