"""`anyformer generate RUN_DIR --prompt "ROMEO:"` (a trained run) or
`anyformer generate --model PATH --prompt ...` (a pretrained checkpoint): stream a continuation
as it is produced, decoding with the KV cache of anyformer.generation."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from ._diffusion import add_diffusion_arguments, check_not_diffusion, run_diffusion_generate
from ._long_context import add_lm_infinite_arguments, apply_lm_infinite_option
from ._pretrained_generate import add_model_arguments, run_generate
from ._sampling import sampling_config

if TYPE_CHECKING:
    from ..generation import GenerationConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser("generate", help="stream text from a trained run or a pretrained checkpoint")
    p.add_argument("run_dir", nargs="?", help="a folder written by `anyformer train` (or give --model)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 or unset = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint of a run")
    p.add_argument("--device", default="auto")
    add_diffusion_arguments(p)
    add_lm_infinite_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to a run folder or a pretrained checkpoint (exactly one must be given)."""
    if (args.run_dir is None) == (args.model is None):
        raise ValueError("give either a run folder (anyformer generate RUN_DIR ...) or --model PATH, not both or neither")
    config = sampling_config(args)  # bad sampling options fail here, before any model is loaded
    if args.model is not None:
        check_not_diffusion(args, "a pretrained checkpoint")
        return run_generate(args, config=config)
    if args.chat or args.system is not None:
        raise ValueError("--chat and --system apply to pretrained checkpoints (--model); a trained run has no chat template")
    return run_from_run_dir(args, config=config)


def run_from_run_dir(args: argparse.Namespace, out=None, *, config: "GenerationConfig | None" = None) -> int:  # type: ignore[no-untyped-def]
    """Print the prompt, then each new piece of text as soon as it is sampled.

    Decoding uses a KV cache. When prompt + new tokens exceed the model's context, a model
    with relative positions (rope, alibi, t5, none) keeps a rolling cache of 4 sink tokens
    plus the most recent ones; one with absolute positions recomputes the last max_seq_len
    tokens per step (anyformer.generation.window). Both sample the same way (same config).
    With --lm-infinite (RoPE runs), the model keeps its own Λ cache (the first tokens plus the
    last window, at their true positions) at any length. A masked-diffusion run drafts instead
    (anyformer/commands/_diffusion.py).
    config: the sampling settings (default: `sampling_config(args)`).
    """
    from ..generation import stream
    from ..generation.window import stream_window
    from ..tasks import TASKS
    from ..training.run import load_run

    out = out or sys.stdout  # looked up per call (tests and callers may redirect it)
    config = config or sampling_config(args)
    if args.prompt == "":
        raise ValueError("--prompt is empty; give at least one character to continue")
    r = load_run(args.run_dir, args.checkpoint, args.device)
    task = TASKS.get(r.cfg.task.kind)
    if task.generates is None:
        writers = [n for n in TASKS.names() if TASKS.get(n).generates]
        raise ValueError(f"{args.run_dir} was trained for task {r.cfg.task.kind!r}, which writes no text; generate needs a "
                         f"{' or '.join(writers)} run. Use: {task.next_commands(args.run_dir)}")
    if task.generates == "diffusion":
        if args.lm_infinite:
            raise ValueError("--lm-infinite applies to decoders; a masked-diffusion run drafts in blocks (see --block)")
        return run_diffusion_generate(args, r, out)
    check_not_diffusion(args, r.cfg.task.kind)
    apply_lm_infinite_option(args, r.model)
    try:
        ids = r.tokenizer.encode(args.prompt)
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    context = r.cfg.model.max_seq_len
    total = len(ids) + config.max_new_tokens
    sinks = 4
    out.write(args.prompt)
    out.flush()
    start = time.perf_counter()
    if r.model.decoding_info().long_context is not None:  # type: ignore[operator]
        tokens = stream(r.model, ids, config)  # its own Λ cache, whatever the length
    elif total > context and r.model.decoding_info().absolute_positions:  # type: ignore[operator]
        print(f"[context {context} < {total} tokens and absolute positions: recomputing the last {context} tokens per step]",
              file=sys.stderr)
        tokens = stream_window(r.model, ids, config, context=context)
    else:
        window = context - sinks if total > context else None
        tokens = stream(r.model, ids, config.with_overrides(window=window, sink_tokens=sinks))
    produced: list[int] = []
    shown = ""
    for token in tokens:
        produced.append(token)
        text = r.tokenizer.decode(produced)
        if not text.endswith("\ufffd") and text.startswith(shown):  # hold back a partial multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(r.tokenizer.decode(produced)[len(shown):] + "\n")
    took = time.perf_counter() - start
    print(f"[{len(produced)} tokens in {took:.1f} s ({len(produced) / max(took, 1e-9):.0f} tokens/s)]", file=sys.stderr)
    return 0
