"""Selective attention's context pruning: memory kept against validation loss.

A selective-attention character LM (the Shakespeare default run with 4 heads and
`model.attention.kind=selective`) is evaluated on held-out text with a KV cache, fed in chunks
as a long generation would be, once per pruning threshold (the same weights; the threshold is
an inference option). For each threshold the table gives the validation loss (nats/char), the
keys each layer's cache held at most (its peak slots, against the context length) and the
bytes its buffers took, with the unpruned cache beside it. The run is trained first if its
folder has no checkpoint.

    PYTHONPATH=. python benchmarks/selective_pruning.py
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from anyformer.data import prepare_tokens
from anyformer.models.builders import build_model
from anyformer.nn.attention.selective import SelectiveKVCache
from anyformer.training.run import load_run


def thresholds(text: str) -> list[float | None]:
    return [None if t == "none" else float(t) for t in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/shakespeare-variants/selective-attention"))
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget when the run must be trained first")
    ap.add_argument("--thresholds", type=thresholds, default=thresholds("none,8,4,2,1,0.5"))
    ap.add_argument("--windows", type=int, default=16, help="validation windows of one context each")
    ap.add_argument("--chunk", type=int, default=8, help="tokens per cached call (pruning happens after each)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/selective_pruning.json"))
    ap.add_argument("--table", type=Path, default=Path("docs/selective_pruning.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if not (args.run / "checkpoints").is_dir():
        cmd = [sys.executable, "-m", "anyformer.cli", "train", "configs/shakespeare-char.yaml", "--out", str(args.run),
               f"--train.max_minutes={args.minutes}", "--model.attention.num_heads=4", "--model.attention.kind=selective"]
        print("training:", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    run = load_run(args.run, "best", "cpu")
    cfg = run.cfg
    if cfg.model.attention.kind != "selective":
        raise SystemExit(f"{args.run} is a '{cfg.model.attention.kind}' model; this benchmark needs selective attention")
    d = cfg.data
    data = prepare_tokens(d.corpus, path=d.path, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction, cache_dir=d.cache_dir)
    ctx_len = cfg.model.max_seq_len
    val = torch.from_numpy(data.val[: args.windows * ctx_len + 1].astype("int64"))
    windows = [val[i * ctx_len : (i + 1) * ctx_len + 1] for i in range(args.windows)]
    torch.set_num_threads(2)
    rows = []
    for t in args.thresholds:
        cfg.model.attention.options = {**cfg.model.attention.options, "prune_threshold": t}
        model = build_model(cfg.model).eval()
        model.load_state_dict(run.model.state_dict())
        losses, full_losses, peaks, nbytes, dropped = [], [], [], [], []
        started = time.perf_counter()
        with torch.no_grad():
            for w in windows:
                x, y = w[None, :-1], w[None, 1:]
                cache = model.make_cache(1, ctx_len)
                logits = torch.cat([model(x[:, i : i + args.chunk], cache) for i in range(0, ctx_len, args.chunk)], 1)
                losses.append(float(F.cross_entropy(logits[0], y[0])))
                full_losses.append(float(F.cross_entropy(model(x)[0], y[0])))  # uncached: the mask prunes
                layers = [c for c in cache.layers if isinstance(c, SelectiveKVCache)]
                peaks.append(sum(c.peak_slots for c in layers) / len(layers))
                nbytes.append(sum(c.nbytes() for c in layers))
                dropped.append(sum(c.pruned_fraction() for c in layers) / len(layers))
        row = {
            "threshold": t, "val_loss": sum(losses) / len(losses), "uncached_val_loss": sum(full_losses) / len(full_losses),
            "peak_keys": sum(peaks) / len(peaks), "context": ctx_len, "cache_bytes": sum(nbytes) / len(nbytes),
            "pruned_fraction": sum(dropped) / len(dropped), "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(f"threshold {t!s:>5}: val {row['val_loss']:.4f} (uncached {row['uncached_val_loss']:.4f})  "
              f"peak keys {row['peak_keys']:.1f}/{ctx_len}  cache {row['cache_bytes'] / 2**10:.0f} KiB  "
              f"pruned {row['pruned_fraction']:.1%}  {row['seconds']:.1f} s", flush=True)
    base = rows[0] if rows[0]["threshold"] is None else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": str(args.run), "windows": args.windows, "chunk": args.chunk, "rows": rows}, indent=2))
    lines = [
        "# Selective attention: context pruning, memory against loss", "",
        f"Generated by `PYTHONPATH=. python benchmarks/selective_pruning.py` on a 2-core CPU: the selective-attention "
        f"Shakespeare model of `benchmarks/shakespeare_variants.py` (6 layers, width 192, 4 heads, context {ctx_len}), "
        f"evaluated on {args.windows} held-out windows of {ctx_len} characters through its KV cache in calls of "
        f"{args.chunk} tokens; after each call the cache drops the keys whose accumulated selection score passed the "
        "threshold. 'peak keys' is the most keys a layer's cache held (mean over layers and windows); 'cache' the bytes "
        "of its buffers (keys, values, selection sums; they grow by doubling). The uncached loss (the same pruning as a "
        "mask over the whole window) equals the cached one, as it must.", "",
        "| threshold | val loss (nats/char) | uncached | peak keys | of context | cache KiB (all layers) | vs unpruned | keys dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['cache_bytes'] / base['cache_bytes']:.2f}x" if base else "-"
        lines.append(
            f"| {r['threshold'] if r['threshold'] is not None else 'none'} | {r['val_loss']:.4f} | {r['uncached_val_loss']:.4f} | "
            f"{r['peak_keys']:.1f} | {r['peak_keys'] / ctx_len:.0%} | {r['cache_bytes'] / 2**10:.0f} | {vs} | {r['pruned_fraction']:.1%} |"
        )
    args.table.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.json} and {args.table}")
    if any(not math.isclose(r["val_loss"], r["uncached_val_loss"], rel_tol=1e-4) for r in rows):
        raise SystemExit("cached and uncached losses differ: the pruned cache does not equal a full recompute")


if __name__ == "__main__":
    main()
