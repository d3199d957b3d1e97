"""`anyformer train [CONFIG.yaml] [--train.lr=1e-3 ...]` and `anyformer train --resume RUN_DIR`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train a language model (default: character-level Shakespeare)",
        description="Train a decoder LM from a run config (model + data + train sections). With no config, "
        "trains the default character-level model on the Shakespeare plays. Any config key can be "
        "overridden as --section.key=value, e.g. --train.lr=1e-3 --model.num_layers=4.",
    )
    p.add_argument("config", nargs="?", help="run config YAML (default: the built-in shakespeare-char config)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--out", metavar="DIR", help="output folder (default: train.out_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run, accepts_overrides=True)


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included); 0 where
    /proc is not available."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run(args: argparse.Namespace) -> int:
    """Train, then print samples and where the files went."""
    start = time.perf_counter() - process_age()  # the time budget covers the whole command
    from ..config import load_yaml
    from ..distributed import teardown
    from ..plugins import imported
    from ..tasks import TASKS
    from ..training import Trainer, load_run_config
    from ..training.config import RunConfig

    if args.resume:
        if args.config:
            raise ValueError("give either a config or --resume RUN_DIR, not both (the run folder holds its config)")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a run folder (no config.yaml); give the folder `anyformer train` wrote")
        cfg = load_yaml(RunConfig, run_dir / "config.yaml")
        if args.overrides:
            from ..config import apply_overrides

            cfg = apply_overrides(cfg, args.overrides)
    else:
        if args.config and Path(args.config).is_dir():
            hint = f"; to continue that run: anyformer train --resume {args.config}" if (Path(args.config) / "config.yaml").is_file() else ""
            raise ValueError(f"{args.config!r} is a folder; give a run config YAML file{hint}")
        if args.config and not Path(args.config).is_file():
            raise FileNotFoundError(f"config file {args.config!r} does not exist")
        cfg = load_run_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else None
    cfg.plugins = list(dict.fromkeys([*cfg.plugins, *imported()]))  # recorded: later commands on the run import them
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir=run_dir, resume=bool(args.resume), start_time=start, verbose=not args.quiet)
        result = trainer.fit()
        is_main = trainer.env.is_main
    finally:
        trainer = None  # the model (and a DDP wrapper's hold on the process group) goes before the group
        teardown()
    if is_main and not args.quiet:
        for i, text in enumerate(result.samples):
            print(f"\n--- sample {i + 1} ---\n{text}")
        d = result.run_dir
        tokenizer = ", tokenizer.json" if (d / "tokenizer.json").is_file() else ""
        task = TASKS.get(cfg.task.kind)
        print(
            f"\ndone: {result.step} steps in {result.seconds / 60:.1f} min | val loss {result.val_loss:.4f} {task.loss_unit} "
            f"(best {result.best_val_loss:.4f})\nfiles: {d}/config.yaml{tokenizer}, metrics.jsonl, loss.png, "
            f"checkpoints/ (latest and best)\nnext: {task.next_commands(d)}"
        )
    return 0
