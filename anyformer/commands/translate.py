"""`anyformer translate RUN "TEXT"`: a sequence_to_sequence run's beam-search translation of a
text (or of every line of standard input with "-")."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `translate` subcommand."""
    p = subparsers.add_parser("translate", help="translate a text with a sequence_to_sequence (encoder-decoder) run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task sequence_to_sequence")
    p.add_argument("text", help='the text to translate; "-" reads one text per line from standard input')
    p.add_argument("--beams", type=int, default=None, help="beam width (default: the task's beams option; 1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest translation in tokens (default: the task's max_target_tokens)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one translation per input text."""
    import sys

    from ..tasks import TASKS
    from ..tasks.sequence_to_sequence import translate
    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if r.cfg.task.kind != "sequence_to_sequence":
        raise ValueError(f"{args.run_dir} was trained for task {r.cfg.task.kind!r}; translate needs a sequence_to_sequence run")
    task = TASKS.get("sequence_to_sequence")(r.cfg)
    options = task.options  # type: ignore[attr-defined]
    texts = [line.strip() for line in sys.stdin if line.strip()] if args.text == "-" else [args.text.strip()]
    if not texts or not all(texts):
        raise ValueError("nothing to translate: the text is empty")
    beams = options.beams if args.beams is None else args.beams
    if beams < 1:
        raise ValueError(f"--beams must be at least 1, got {beams}")
    limit = options.max_target_tokens if args.max_new_tokens is None else args.max_new_tokens
    if limit < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {limit}")
    memories = task.memories(texts)  # type: ignore[attr-defined]  # a run trained with a translation memory retrieves as in training
    for line in translate(r.model, r.tokenizer, texts, beams=beams, max_new_tokens=limit,  # type: ignore[arg-type]
                          no_repeat_ngram=options.no_repeat_ngram, memories=memories, max_source_tokens=options.max_source_tokens):
        print(line)
    return 0
