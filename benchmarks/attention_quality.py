"""Quality of every registered attention kind on two synthetic recall tasks.

Small decoder LMs of equal size, one per attention kind in the ATTENTIONS registry, are
trained from scratch on
  * MQAR, multi-query associative recall (Arora et al. 2023, "Zoology"): key-value pairs,
    then queried keys; the model must emit each queried key's value;
  * copying: a random token string, a separator, then the same string again;
and scored by exact-token accuracy on the answer positions of fresh samples. Results go to a
Markdown table and a JSON file.

    PYTHONPATH=. python benchmarks/attention_quality.py            # full table (~40 min on one core)
    PYTHONPATH=. python benchmarks/attention_quality.py --quick    # ~5 min
    PYTHONPATH=. python benchmarks/attention_quality.py --kinds mha --variants depth=looped   # one more part

Kinds that need options to run at these lengths get them from KIND_OPTIONS; a kind that cannot
be built or trained is listed with the reason instead of a score.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from anyformer.config import ModelConfig, from_dict
from anyformer.models import build_model
from anyformer.models.builders import count_parameters
from anyformer.nn.attention import ATTENTIONS

# Options scaled to these short sequences (24-64 tokens): HyperAttention would otherwise fall
# back to exact attention, and the sparse kinds' default windows (128-256) would cover the whole
# sequence and make them full attention. With windows of 8 a key-value pair or a copied token is
# usually further back than the window, which is the regime these tasks probe.
KIND_OPTIONS: dict[str, dict] = {
    "hyper": {"min_seq_len": 16, "block_size": 8, "sample_size": 8},
    "performer": {"num_features": 64, "redraw_interval": 0},
    "sliding_window": {"window": 8},
    "strided": {"stride": 8},
    "fixed": {"stride": 8, "num_summary": 2},
    "block_local": {"block": 8},
    "dilated": {"window": 4, "dilation": 2},
    "lambda_shaped": {"window": 8, "num_global": 4},
}


def mqar_batch(batch: int, pairs: int, queries: int, num_keys: int, num_values: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR sequences (b, 2 * (pairs + queries)) and targets (-100 outside the answers)."""
    keys = torch.stack([torch.randperm(num_keys, generator=g)[:pairs] for _ in range(batch)])  # (b, P)
    values = torch.randint(0, num_values, (batch, pairs), generator=g) + num_keys  # (b, P)
    ctx = torch.stack([keys, values], -1).flatten(1)  # (b, 2P): k1 v1 k2 v2 ...
    pick = torch.randint(0, pairs, (batch, queries), generator=g)  # (b, Q)
    qk, qv = keys.gather(1, pick), values.gather(1, pick)
    tail = torch.stack([qk, qv], -1).flatten(1)  # (b, 2Q): q1 a1 q2 a2 ...
    tokens = torch.cat([ctx, tail], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs :: 2] = qv  # at each queried key, predict its value
    return tokens, targets


def copy_batch(batch: int, length: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Copying sequences (b, 2 * length + 1): x, separator, x; targets on the second copy."""
    x = torch.randint(1, vocab, (batch, length), generator=g)
    sep = torch.zeros(batch, 1, dtype=torch.long)
    tokens = torch.cat([x, sep, x], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, length : 2 * length] = x  # from the separator on, predict the next copied token
    return tokens, targets


def make_task(name: str, quick: bool, pairs: int | None = None, num_keys: int = 16):  # type: ignore[no-untyped-def]
    """(sampler(batch, generator), vocab size, sequence length) of a task. MQAR draws `pairs`
    distinct keys out of `num_keys` and values out of as many value tokens, then asks as many
    queries as there are pairs."""
    if name == "mqar":
        pairs = pairs or (6 if quick else 8)
        queries = pairs
        return (lambda b, g: mqar_batch(b, pairs, queries, num_keys, num_keys, g)), 2 * num_keys, 2 * (pairs + queries)
    length = 12 if quick else 16
    return (lambda b, g: copy_batch(b, length, 32, g)), 32, 2 * length + 1


# Variants that are not attention kinds: multi-head attention with one other part changed
# (selected with --variants; a row's name is the variant's)
VARIANTS: dict[str, dict] = {
    "block=simplified": {"block": {"kind": "simplified"}, "attention": {"kind": "shaped"}},
    "block=parallel": {"block": {"kind": "parallel"}},
    "depth=denseformer": {"depth": {"kind": "denseformer"}},
    "depth=looped": {"depth": {"kind": "looped", "options": {"loops": 2}}},
    "positional=learnable_sinusoidal": {"positional": {"kind": "learnable_sinusoidal"}},
}


def model_config(kind: str, vocab: int, seq_len: int, dim: int = 64) -> ModelConfig:
    """A 2-layer decoder (width 64 unless told) with RoPE (none for the RWKV kinds); only the attention kind (or, for a
    name in VARIANTS, that one part) differs between runs."""
    variant = VARIANTS.get(kind, {})
    attn_kind = variant.get("attention", {}).get("kind", "mha" if kind in VARIANTS else kind)
    # a recurrence that knows the order of its tokens (rwkv4, rwkv7) takes no positional encoding
    orders_itself = attn_kind in ATTENTIONS and getattr(ATTENTIONS.get(attn_kind), "orders_itself", False)
    return from_dict(
        ModelConfig,
        dict(
            arch="decoder", vocab_size=vocab, dim=dim, num_layers=2, max_seq_len=seq_len,
            attention=dict(kind=attn_kind, num_heads=4, options=KIND_OPTIONS.get(attn_kind, {})),
            positional=variant.get("positional", dict(kind="none" if orders_itself else "rope")), ffn=dict(kind="swiglu", hidden_mult=2.0),
            **{k: v for k, v in variant.items() if k in ("block", "depth")},
        ),
    ).validate()


def accuracy(model: torch.nn.Module, sampler, batches: int, g: torch.Generator) -> float:  # type: ignore[no-untyped-def]
    """Exact-token accuracy on answer positions of fresh samples."""
    model.eval()
    hit = total = 0
    with torch.no_grad():
        for _ in range(batches):
            tokens, targets = sampler(128, g)
            pred = model(tokens).argmax(-1)
            sel = targets != -100
            hit += int((pred[sel] == targets[sel]).sum())
            total += int(sel.sum())
    model.train()
    return hit / total


def run(
    kind: str, task: str, steps: int, quick: bool, seed: int, lr: float = 1e-3, *,
    pairs: int | None = None, num_keys: int = 16, dim: int = 64, log_every: int = 0,
) -> dict:
    """Train one model on one task; return its row of the results."""
    sampler, vocab, seq_len = make_task(task, quick, pairs, num_keys)
    torch.manual_seed(seed)
    try:
        model = build_model(model_config(kind, vocab, seq_len, dim))
    except (ValueError, TypeError) as e:
        return {"kind": kind, "task": task, "error": f"cannot build: {e}"}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            tokens, targets = sampler(64, g)
            loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            if log_every and step % log_every == 0:
                print(f"  {kind} {task} step {step} loss {loss.item():.3f}", flush=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        acc = accuracy(model, sampler, 4, torch.Generator().manual_seed(seed + 2))
    except (ValueError, RuntimeError) as e:
        return {"kind": kind, "task": task, "error": f"cannot train: {e}"}
    return {
        "kind": kind, "task": task, "accuracy": acc, "final_loss": loss.item(), "steps": steps,
        "seq_len": seq_len, "params": count_parameters(model), "seconds": time.perf_counter() - start,
        "options": KIND_OPTIONS.get(kind, {}),
    }


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    """Markdown: one line per kind, one accuracy column per task."""
    tasks = sorted({r["task"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    cell = {(r["kind"], r["task"]): r for r in rows}
    lines = [
        "# Attention quality on synthetic recall",
        "",
        f"Generated by `benchmarks/attention_quality.py{' --quick' if args.quick else ''}` "
        f"({args.steps} steps, batch 64, peak lr {args.lr:g}, seed {args.seed}; MQAR: {args.pairs or (6 if args.quick else 8)} "
        f"pairs over {args.keys} keys). 2-layer width-{args.dim} decoders with RoPE (the RWKV kinds, which order tokens themselves: none), identical except the attention kind; "
        "accuracy is exact-token accuracy on answer positions of 512 fresh samples. A row named part=kind is multi-head "
        "attention with that one part changed (block kind, depth wiring, positional encoding; block=simplified uses shaped attention, "
        "depth=looped applies the 2 blocks twice).",
        "",
        "| kind | " + " | ".join(f"{t} acc" for t in tasks) + " | params | options |",
        "|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for k in kinds:
        accs, params, opts = [], "", ""
        for t in tasks:
            r = cell.get((k, t), {})
            accs.append(f"{r['accuracy']:.3f}" if "accuracy" in r else f"n/a ({r.get('error', 'not run')[:60]})")
            params = params or str(r.get("params", ""))
            opts = opts or json.dumps(r.get("options", {})) if "options" in r else opts
        lines.append(f"| {k} | " + " | ".join(accs) + f" | {params} | {opts or '{}'} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter tasks and fewer steps (~1-2 min)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 2000, quick 300)")
    parser.add_argument("--kinds", nargs="*", default=None, help="attention kinds (default: every registered kind)")
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="other variants (block kinds, depth wirings, positions) on multi-head attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=["mqar", "copy"], choices=["mqar", "copy"])
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warmup 50 steps, cosine to 0)")
    parser.add_argument("--pairs", type=int, default=None, help="MQAR key-value pairs (default 8, quick 6)")
    parser.add_argument("--keys", type=int, default=16, help="MQAR key tokens (and as many value tokens)")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps (0: never)")
    parser.add_argument("--table", type=Path, default=Path("docs/attention_quality.md"))
    parser.add_argument("--json", type=Path, default=Path("docs/attention_quality.json"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--from-json", type=Path, nargs="*", default=None,
                        help="write the table from these result files (e.g. runs split over processes with --kinds) and exit")
    args = parser.parse_args()
    args.steps = args.steps or (300 if args.quick else 2000)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(f.read_text())["results"]]
        write_table(rows, args.table, args)
        args.json.write_text(json.dumps({"steps": args.steps, "quick": args.quick, "results": rows}, indent=2) + "\n")
        print(f"table: {args.table} ({len(rows)} rows), JSON: {args.json}")
        return
    torch.set_num_threads(args.threads)
    kinds = (args.kinds if args.kinds is not None else [] if args.variants else ATTENTIONS.names()) + args.variants
    rows, t0 = [], time.perf_counter()
    todo = [(k, t) for k in kinds for t in args.tasks]
    for i, (kind, task) in enumerate(todo):
        r = run(kind, task, args.steps, args.quick, args.seed, args.lr, pairs=args.pairs, num_keys=args.keys, dim=args.dim,
                log_every=args.log_every)
        rows.append(r)
        elapsed = time.perf_counter() - t0
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        result = f"acc {r['accuracy']:.3f} loss {r['final_loss']:.3f}" if "accuracy" in r else r["error"][:80]
        print(f"[{i + 1}/{len(todo)}] {kind:>12} {task:>5}: {result}  ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)", flush=True)
        # results so far are on disk after every run: an interrupted table loses one run at most
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "quick": args.quick, "results": rows}, indent=2) + "\n")
    write_table(rows, args.table, args)
    print(f"done in {time.perf_counter() - t0:.0f}s; table: {args.table}, JSON: {args.json}")


if __name__ == "__main__":
    main()
