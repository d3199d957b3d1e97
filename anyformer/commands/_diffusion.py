"""The options of masked-diffusion decoding shared by `anyformer generate` and `anyformer infill`,
and generation from a masked-diffusion run (anyformer/generation/diffusion.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ._args import at_least

DIFFUSION_FLAGS = {"steps": "--steps", "order": "--order", "edit": "--edit", "block": "--block", "show_steps": "--show-steps"}


def add_diffusion_arguments(p: argparse.ArgumentParser, *, generate: bool = True) -> None:
    """The unmasking options (for masked-diffusion runs only)."""
    from ..generation.diffusion import ORDERS

    g = p.add_argument_group("masked-diffusion runs (task masked_diffusion)")
    g.add_argument("--steps", type=at_least(1), default=None,
                   help="model calls to draft the new tokens (per block); at most one per token (default: 64, or the number of tokens if fewer)")
    g.add_argument("--order", choices=ORDERS, default=None, help="which masked positions are drafted first (default: confidence)")
    g.add_argument("--edit", action="store_true", default=None,
                   help="low-confidence remasking: earlier drafts compete with new ones by confidence and the least confident are redrawn")
    if generate:
        g.add_argument("--block", type=at_least(1), default=None,
                       help="draft the new tokens in blocks of this many, each conditioned on the text before it "
                            "(default: all at once when prompt and new tokens fit in the context, else half the context)")
    g.add_argument("--show-steps", action="store_true", default=None, help="print the sequence after every step (masks as '_') to stderr")


def check_not_diffusion(args: argparse.Namespace, what: str) -> None:
    """Refuse the unmasking options for a model that decodes left to right."""
    given = [flag for name, flag in DIFFUSION_FLAGS.items() if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to masked-diffusion runs (task masked_diffusion); {what} decodes left to "
                         f"right. Drop {' and '.join(given)}")


def check_diffusion_flags(args: argparse.Namespace, tokens: int) -> None:
    """Refuse what masked-diffusion drafting of `tokens` tokens at once cannot take."""
    if getattr(args, "top_p", 1.0) != 1.0:
        raise ValueError("--top-p (nucleus sampling) is not offered by masked-diffusion drafting: each step draws every masked "
                         "position at once; use --temperature and --top-k")
    if args.steps is not None and args.steps > tokens:
        raise ValueError(f"--steps {args.steps} is more than the {tokens} tokens drafted together; use at most {tokens} (one token per step)")


def diffusion_config(args: argparse.Namespace, tokens: int) -> Any:
    """The DiffusionConfig of the command's options for drafting `tokens` tokens at once."""
    from ..generation.diffusion import DiffusionConfig

    check_diffusion_flags(args, tokens)
    steps = args.steps if args.steps is not None else min(64, tokens)
    config = DiffusionConfig(steps=steps, temperature=args.temperature, top_k=args.top_k or 0, order=args.order or "confidence",
                             edit=bool(args.edit), seed=args.seed)
    try:
        return config.validate()
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        flag = {"steps": "--steps", "temperature": "--temperature", "top_k": "--top-k", "order": "--order", "edit": "--edit"}.get(field)
        raise ValueError(f"{flag} {rest}" if flag else str(e)) from None


class StepPrinter:
    """Prints the drafted sequence after every step (masks as '_') to stderr when asked, and
    counts edits (drafts masked again)."""

    def __init__(self, tokenizer: Any, show: bool) -> None:
        self.tokenizer, self.show, self.edits, self.previous = tokenizer, show, 0, None

    def __call__(self, step: int, tokens: Any, masked: Any, fill: Any) -> None:
        if step > 1 and self.previous is not None:
            self.edits += int((masked & ~self.previous).sum())
        self.previous = masked.clone()
        if self.show:
            part = fill[0].nonzero().flatten().tolist()
            row, hidden = tokens[0, part].tolist(), masked[0, part].tolist()
            text = "".join("_" if h else self.tokenizer.decode([t]) for t, h in zip(row, hidden))
            print(f"[step {step:>4}] {text!r}", file=sys.stderr)


def run_diffusion_generate(args: argparse.Namespace, r: Any, out: Any) -> int:
    """`anyformer generate` on a masked-diffusion run: print the prompt and the drafted text."""
    from ..generation.diffusion import diffusion_generate

    tok, context = r.tokenizer, r.cfg.model.max_seq_len
    try:
        ids = tok.encode(args.prompt)
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    new = args.max_new_tokens
    block = args.block
    if block is None:
        block = new if len(ids) + new <= context else context // 2
    if not 1 <= block < context:
        raise ValueError(f"--block must be between 1 and {context - 1} (the model's context is {context} tokens); got {block}")
    config = diffusion_config(args, min(block, new))
    printer = StepPrinter(tok, bool(args.show_steps))
    start = time.perf_counter()
    produced = diffusion_generate(r.model, ids, new, tok.vocab_size, context, config, block=block, on_step=printer)
    took = time.perf_counter() - start
    out.write(args.prompt + tok.decode(produced) + "\n")
    out.flush()
    blocks = -(-new // block)
    print(f"[{len(produced)} tokens in {took:.1f} s: {blocks} block(s) of up to {block}, {config.steps} steps each, order "
          f"{config.order}{f', {printer.edits} drafts redrawn' if config.edit else ''}]", file=sys.stderr)
    return 0
