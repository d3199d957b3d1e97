"""The LM-Infinite options shared by `anyformer generate` and `anyformer eval`
(anyformer/longcontext/lm_infinite.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_lm_infinite_arguments(p: argparse.ArgumentParser) -> None:
    """--lm-infinite and its settings."""
    g = p.add_argument_group("LM-Infinite (RoPE models: read past the trained context, no training)")
    g.add_argument("--lm-infinite", action="store_true",
                   help="Λ-shaped attention (the first tokens plus a recent window) with rotary distances capped at the window")
    g.add_argument("--lm-infinite-window", type=int, default=None, help="recent tokens each query sees (default: the model's max_seq_len)")
    g.add_argument("--lm-infinite-global", type=int, default=None, help="first tokens every query sees (default 10)")


def apply_lm_infinite_option(args: argparse.Namespace, model: Any) -> Any:
    """Switch `model` to LM-Infinite when --lm-infinite is given; refuse its settings without it."""
    from ..longcontext import apply_lm_infinite
    from ..longcontext.lm_infinite import LMInfiniteOptions

    if not args.lm_infinite:
        given = [flag for flag, value in (("--lm-infinite-window", args.lm_infinite_window),
                                          ("--lm-infinite-global", args.lm_infinite_global)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set LM-Infinite up; add --lm-infinite")
        return model
    if args.lm_infinite_window is not None and args.lm_infinite_window < 1:
        raise ValueError(f"--lm-infinite-window must be at least 1, got {args.lm_infinite_window}")
    if args.lm_infinite_global is not None and args.lm_infinite_global < 0:
        raise ValueError(f"--lm-infinite-global must be at least 0, got {args.lm_infinite_global}")
    num_global = LMInfiniteOptions.num_global if args.lm_infinite_global is None else args.lm_infinite_global
    apply_lm_infinite(model, window=args.lm_infinite_window, num_global=num_global)
    lc = model.decoding_info().long_context
    print(f"[LM-Infinite: the first {lc.sinks} tokens and the last {lc.window}, rotary distances capped at "
          f"{args.lm_infinite_window or model.config.max_seq_len}]", file=sys.stderr)
    return model
