"""`anyformer bench attention`: time and memory of every attention kind against length."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# BenchConfig field -> the option that sets it (validation messages name the option)
FLAGS = {"lengths": "--lengths", "methods": "--methods", "num_heads": "--heads", "head_dim": "--head-dim",
         "window": "--window", "threads": "--threads", "repeats": "--repeats", "rounds": "--rounds",
         "max_seconds": "--max-seconds", "max_memory_gb": "--max-memory-gb", "min_time": "--min-time",
         "positional": "--positional", "device": "--device"}


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    """Add `bench` with its `attention` subcommand."""
    bench = subparsers.add_parser("bench", help="benchmarks that print figures and write JSON and plots")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser("attention", help="time and peak memory of every attention kind/kernel against sequence length")
    p.add_argument("--methods", type=_names, default=None,
                   help="comma-separated methods (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the available methods and exit")
    p.add_argument("--lengths", type=_ints, default=None, help="comma-separated lengths (default 512..32768)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--passes", choices=["both", "forward", "backward"], default="both",
                   help="forward only, forward+backward, or both")
    p.add_argument("--mode", choices=["kernel", "module"], default="kernel",
                   help="kernel: the attention operation on ready q, k, v (a materialised mask/bias counts); "
                        "module: whole attention modules from x, projections included")
    p.add_argument("--positional", default="none", help="positional encoding for every method (e.g. alibi)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="window of windowed kinds and of sdpa+dense-window")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default: all cores)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="skip configurations predicted to take longer")
    p.add_argument("--max-memory-gb", type=float, default=12.0, help="skip configurations predicted to need more")
    p.add_argument("--min-time", type=float, default=1.0, help="repeat a measurement until this much time passed")
    p.add_argument("--repeats", type=int, default=3, help="at most this many timed repeats after the first call")
    p.add_argument("--rounds", type=int, default=1,
                   help="sweep everything this many times (fresh processes each time) and keep each configuration's best")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for attention.json and attention.png")
    p.set_defaults(func=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    """Validate every option, run the sweep, print a summary; exit status 1 when no
    configuration could be measured (every one failed)."""
    import sys

    from ..bench.attention import BenchConfig, all_methods, run

    available = all_methods(args.mode)
    if args.list:
        print("\n".join(available))
        return 0
    methods = available if args.methods is None else args.methods
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {unknown}; available: {', '.join(available)}")
    cfg = BenchConfig(
        methods=methods,
        causal={"both": [True, False], "yes": [True], "no": [False]}[args.causal],
        passes={"both": ["forward", "backward"], "forward": ["forward"], "backward": ["backward"]}[args.passes],
        positional=args.positional, mode=args.mode, num_heads=args.heads, head_dim=args.head_dim, window=args.window,
        dtype=args.dtype, device=args.device, max_seconds=args.max_seconds, max_memory_gb=args.max_memory_gb,
        min_time=args.min_time, repeats=args.repeats, rounds=args.rounds,
    )
    if args.lengths is not None:
        cfg.lengths = args.lengths
    if args.threads is not None:
        cfg.threads = args.threads
    try:
        cfg.validate()
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"{FLAGS[field]} {rest}" if field in FLAGS else str(e)) from None
    started = time.perf_counter()
    results = run(cfg, args.out)
    measured = sum("time_s" in r for r in results)
    skipped = sum("skipped" in r for r in results)
    failed = sum("error" in r for r in results)
    print(
        f"done in {time.perf_counter() - started:.0f} s: {measured} measured, {skipped} skipped, {failed} failed; "
        f"wrote {args.out / 'attention.json'} and {args.out / 'attention.png'}"
    )
    if measured == 0:
        errors = list(dict.fromkeys(r["error"] for r in results if "error" in r))
        print(f"anyformer bench attention: error: no configuration could be measured ({failed} failed, {skipped} skipped); "
              f"first error(s): {' | '.join(errors[:3]) or 'none'}", file=sys.stderr)
        return 1
    return 0
