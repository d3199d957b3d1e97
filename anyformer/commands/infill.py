"""`anyformer infill RUN "LEFT" "RIGHT" --length N`: fill a gap of N tokens between two texts
with a masked-diffusion run (task masked_diffusion); the given texts are never changed. The
task's prediction with its settings as flags: `anyformer predict RUN "LEFT[[N]]RIGHT"` is the
same fill."""

from __future__ import annotations

import argparse
import sys
import time

from ._args import at_least
from ._diffusion import StepPrinter, add_diffusion_arguments, check_diffusion_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `infill` subcommand."""
    p = subparsers.add_parser("infill", help="fill a gap between two texts with a masked-diffusion run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task masked_diffusion")
    p.add_argument("left", help="the text before the gap (may be empty)")
    p.add_argument("right", help="the text after the gap (may be empty)")
    p.add_argument("--length", type=at_least(1), required=True, help="tokens (characters for a char-level run) in the gap")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = the most likely token at each drafted position")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 or unset = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mark", action="store_true", help="show the filled gap between [[ and ]]")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    add_diffusion_arguments(p, generate=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the left text, the filled gap and the right text (the task's `fill`, which
    `anyformer predict RUN "LEFT[[N]]RIGHT"` also uses)."""
    from ._predict import load_served_run, task_settings

    if args.length < 1:
        raise ValueError(f"--length must be at least 1 token, got {args.length}")
    r, task = load_served_run(args.run_dir, args.checkpoint, args.device, "infill",
                              " (a left-to-right decoder cannot condition on the text after the gap)")
    check_diffusion_flags(args, args.length)
    given = {"steps": args.steps, "order": args.order, "edit": args.edit, "temperature": args.temperature, "top_k": args.top_k,
             "seed": args.seed}
    settings = task_settings(task, given, flag=True)
    printer = StepPrinter(r.tokenizer, bool(args.show_steps))
    start = time.perf_counter()
    try:
        gap = task.fill(r.model, r.tokenizer, [args.left, args.right], [args.length], settings, on_step=printer)[0]
    except ValueError as e:  # the task names its settings; this command's flags carry the same names
        raise ValueError(_as_flags(str(e))) from None
    took = time.perf_counter() - start
    config = task.drafting(settings, args.length)
    print(args.left + (f"[[{gap}]]" if args.mark else gap) + args.right)
    print(f"[{args.length} tokens filled in {took:.1f} s, {config.steps} steps, order {config.order}"
          f"{f', {printer.edits} drafts redrawn' if config.edit else ''}]", file=sys.stderr)
    return 0


def _as_flags(message: str) -> str:
    """A task's message about one of its settings ("edit (...) needs ...") in this command's flags."""
    name, _, rest = message.partition(" ")
    flag = {"steps": "--steps", "order": "--order", "edit": "--edit", "temperature": "--temperature", "top_k": "--top-k"}.get(name)
    return f"{flag} {rest}" if flag else message
