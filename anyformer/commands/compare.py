"""`anyformer compare SPEC.yaml`: train named variants of a run config on equal budgets, over
several seeds, and write a results table (results.md, results.json) and plots."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    p = subparsers.add_parser(
        "compare", help="train variants of a run config on equal budgets and compare them (table and plots)",
        description="Train every variant x seed of a comparison spec through the ordinary trainer, one run after "
        "another (or `parallel` at once), then write results.json, results.md and PNG plots. Running it again "
        "skips finished runs and resumes interrupted ones. See anyformer/training/compare.py for the spec format.",
    )
    p.add_argument("spec", help="comparison spec YAML (base, variants, budget, seeds)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/compare-<spec name>)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or finish) the comparison and print the table."""
    from pathlib import Path

    from ..training.compare import load_spec, run_comparison
    from ..training.compare_report import results_markdown

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.spec).stem}"
    results = run_comparison(spec, out, verbose=not args.quiet)
    if not args.quiet:
        print("\n" + results_markdown(results))
    failed = [v["name"] for v in results["variants"] if v["status"] != "ok"]
    return 1 if failed and len(failed) == len(results["variants"]) else 0
