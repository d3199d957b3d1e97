"""`anyformer eval RUN_DIR`: a run's held-out metrics (a causal LM: loss, perplexity, bits per
character; other tasks: their own metrics, e.g. a masked LM's perplexity, accuracy and unigram
baseline)."""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser("eval", help="validation loss, perplexity and bits/char of a trained run")
    p.add_argument("run_dir", help="a folder written by `anyformer train`")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint (default best)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: 4 x train.eval_batches)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the figures."""
    from ..data import prepare_tokens
    from ..training.distributed import DistEnv
    from ..training.run import load_run
    from ..training.trainer import evaluate

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if r.cfg.task.kind != "causal_lm":
        return _run_task(args, r)
    d = r.cfg.data
    data = prepare_tokens(d.corpus, path=d.path, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                          val_fraction=d.val_fraction, cache_dir=d.cache_dir)
    if data.tokenizer.to_json() != r.tokenizer.to_json():
        raise ValueError(f"the corpus now tokenizes differently from the run's tokenizer.json; the data of {args.run_dir} changed")
    device = next(r.model.parameters()).device
    batches = args.batches or 4 * r.cfg.train.eval_batches
    loss = evaluate(r.model, data.val, r.cfg.train, DistEnv(0, 1, 0, device), batches=batches)
    tokens = batches * r.cfg.train.batch_size * r.cfg.train.seq_len
    text = data.tokenizer.decode(data.val[: min(len(data.val), 200_000)].astype("int64").tolist())
    chars_per_token = len(text) / min(len(data.val), 200_000)
    bpc = loss / math.log(2) / chars_per_token
    print(f"run            {args.run_dir} ({r.checkpoint.name}, step {r.state['step']})")
    print(f"validation     {tokens:,} tokens from held-out documents: {', '.join(data.val_names)}")
    print(f"loss           {loss:.4f} nats/token")
    print(f"perplexity     {math.exp(loss):.3f} (per token)")
    print(f"bits/char      {bpc:.4f} ({chars_per_token:.3f} characters per token)")
    return 0


def _run_task(args: argparse.Namespace, r) -> int:  # type: ignore[no-untyped-def]
    """Any other task: its own evaluation on its held-out data, every metric printed."""
    from ..tasks import TASKS
    from ..training.distributed import DistEnv

    task = TASKS.get(r.cfg.task.kind)(r.cfg)
    device = next(r.model.parameters()).device
    env = DistEnv(0, 1, 0, device)
    data = task.prepare(env)
    if data.tokenizer is not None and (r.tokenizer is None or data.tokenizer.to_json() != r.tokenizer.to_json()):
        raise ValueError(f"the data now tokenizes differently from the run's tokenizer.json; the data of {args.run_dir} changed")
    batches = args.batches or 4 * r.cfg.train.eval_batches
    scores = task.evaluate(r.model, data, env, batches=batches)
    print(f"run            {args.run_dir} ({r.checkpoint.name}, step {r.state['step']}, task {r.cfg.task.kind})")
    print(f"validation     the held-out split ({task.describe(data)})")
    for name, value in scores.items():
        print(f"{name:<14} {value:.4f}")
    for name, value in task.report(r.model, data, env, r.checkpoint.parent.parent).items():
        print(f"{name:<14} {value:.4f}" if isinstance(value, float) else f"{name:<14} {value}")
    return 0
