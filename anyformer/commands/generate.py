"""`anyformer generate RUN_DIR --prompt "ROMEO:"`: stream a continuation from a trained run."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser("generate", help="stream text from a trained run")
    p.add_argument("run_dir", help="a folder written by `anyformer train`")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the prompt, then each new piece of text as soon as it is sampled."""
    import torch

    from ..training.run import autocast_dtype, load_run
    from ..training.sampling import sample_stream

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    r = load_run(args.run_dir, args.checkpoint, args.device)
    if args.prompt == "":
        raise ValueError("--prompt is empty; give at least one character to continue")
    try:
        ids = r.tokenizer.encode(args.prompt)
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    device = next(r.model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed) if args.seed is not None else gen.seed()
    prompt = torch.tensor([ids], device=device)
    dtype = autocast_dtype(r.cfg)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    produced: list[int] = []
    shown = ""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for nxt in sample_stream(r.model, prompt, args.max_new_tokens, context=r.cfg.model.max_seq_len,
                                 temperature=args.temperature, top_k=args.top_k, generator=gen):
            produced.append(int(nxt[0]))
            text = r.tokenizer.decode(produced)
            if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text
    out.write("\n")
    return 0
