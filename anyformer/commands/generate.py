"""`anyformer generate RUN_DIR --prompt "ROMEO:"` (a trained run) or
`anyformer generate --model PATH --prompt ...` (a pretrained checkpoint): stream a continuation
as it is produced, decoding with the KV cache of anyformer.generation."""

from __future__ import annotations

import argparse
import sys
import time

from ..pretrained.chat import add_model_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser("generate", help="stream text from a trained run or a pretrained checkpoint")
    p.add_argument("run_dir", nargs="?", help="a folder written by `anyformer train` (or give --model)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint of a run")
    p.add_argument("--device", default="auto")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to a run folder or a pretrained checkpoint (exactly one must be given)."""
    if (args.run_dir is None) == (args.model is None):
        raise ValueError("give either a run folder (anyformer generate RUN_DIR ...) or --model PATH, not both or neither")
    if args.model is not None:
        from ..pretrained.chat import run_generate

        return run_generate(args)
    if args.chat or args.system is not None:
        raise ValueError("--chat and --system apply to pretrained checkpoints (--model); a trained run has no chat template")
    return run_from_run_dir(args)


def run_from_run_dir(args: argparse.Namespace, out=None) -> int:  # type: ignore[no-untyped-def]
    """Print the prompt, then each new piece of text as soon as it is sampled.

    Decoding uses a KV cache. When prompt + new tokens exceed the model's context, a model
    with relative positions (rope, alibi, t5, none) keeps a rolling cache of 4 sink tokens
    plus the most recent ones; one with absolute positions recomputes a cropped window.
    """
    from ..generation import GenerationConfig, stream
    from ..generation.runner import uses_absolute_positions
    from ..training.run import load_run
    from ..training.sampling import sample_stream

    out = out or sys.stdout  # looked up per call (tests and callers may redirect it)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.prompt == "":
        raise ValueError("--prompt is empty; give at least one character to continue")
    r = load_run(args.run_dir, args.checkpoint, args.device)
    try:
        ids = r.tokenizer.encode(args.prompt)
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    context = r.cfg.model.max_seq_len
    total = len(ids) + args.max_new_tokens
    sinks = 4
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k or 0, top_p=args.top_p,
        seed=args.seed, window=context - sinks if total > context else None, sink_tokens=sinks,
    ).validate()
    out.write(args.prompt)
    out.flush()
    start = time.perf_counter()
    if total > context and uses_absolute_positions(r.model.positional):  # type: ignore[arg-type]
        print(f"[context {context} < {total} tokens and absolute positions: recomputing the last {context} tokens per step]",
              file=sys.stderr)
        import torch

        gen = torch.Generator(device=next(r.model.parameters()).device)
        gen.manual_seed(args.seed) if args.seed is not None else gen.seed()
        prompt = torch.tensor([ids], device=gen.device)
        tokens = (int(t[0]) for t in sample_stream(r.model, prompt, args.max_new_tokens, context=context,
                                                     temperature=args.temperature, top_k=args.top_k, generator=gen))
    else:
        tokens = stream(r.model, ids, config)
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
