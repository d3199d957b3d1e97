"""The sampling options of the text-generating commands, checked once for every path."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..generation import GenerationConfig

FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def sampling_config(args: argparse.Namespace) -> "GenerationConfig":
    """The validated GenerationConfig of the sampling options (--max-new-tokens, --temperature
    (0 = greedy), --top-k, --top-p, --seed); ValueError naming the bad option otherwise."""
    from ..generation import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=0 if args.top_k is None else args.top_k, top_p=args.top_p, seed=args.seed,
    )
    try:
        return config.validate()
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"{FLAGS[field]} {rest}" if field in FLAGS else str(e)) from None
