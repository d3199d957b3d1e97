"""kNN memory retrieval on long documents: perplexity against memory size, beside the other
memories, at equal training.

    python benchmarks/bench_knn_memory.py --out benchmarks/results/knn_memory.json

Data: the Python standard library's source files (corpus `python_stdlib`, characters), each
file a document opened by DOCUMENT_START; whole files are held out for evaluation. Every model
is the same character-level decoder (`--dim`, `--layers`, 4 heads, RoPE) reading 256-token
segments (`--segment`), trained by `anyformer`'s Trainer on the same random windows of
`--seq-len` tokens for the same `--steps`:

- segmented: each segment read alone (kNN memory of size 0): the baseline;
- knn: the last layer retrieves the top-32 (key, value) pairs of the same file's earlier
  segments (memory of `--train-memory` tokens in training), learned per-head gate;
- rmt: 16 memory tokens carried from segment to segment;
- infinite_former: a continuous memory of 64 basis functions per layer.

Evaluation: `--windows` held-out windows of `--eval-len` tokens (fixed starts); the loss counts
the last `--scored` tokens of each window, so every memory size has the same text before it.
The kNN model is evaluated with memories of 0, 1k, 4k and 16k tokens (the memory's size is not
a weight: the same trained model), and with faiss exact and HNSW search at 16k; the
retrieval's share of time is 1 - (time with memory 0) / (time with memory M) for the same
windows. Records the processor with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import processor  # benchmarks/machine.py


def variants(args) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    seg = f"--model.memory.options.segment_len={args.segment}"
    knn = ["--model.memory.kind=knn", seg, "--model.memory.options.top_k=32", "--model.memory.options.boundary_token=1"]
    return {
        "segmented": [*knn, "--model.memory.options.memory_size=0"],
        "knn": [*knn, f"--model.memory.options.memory_size={args.train_memory}"],
        "rmt": ["--model.memory.kind=rmt", seg, "--model.memory.options.num_memory=16",
                f"--model.max_seq_len={args.segment + 32}"],
        "infinite_former": ["--model.memory.kind=infinite_former", seg, "--model.memory.options.num_basis=64"],
    }


def run_config(args, extra: list[str], out: Path):  # type: ignore[no-untyped-def]
    from anyformer.config import apply_overrides
    from anyformer.training.config import default_run_config

    return apply_overrides(default_run_config(), [
        "--task.kind=causal_lm", "--data.corpus=python_stdlib", "--data.tokenizer=char", f"--model.dim={args.dim}",
        f"--model.num_layers={args.layers}", "--model.attention.num_heads=4", "--model.ffn.hidden_dim=null",
        f"--model.max_seq_len={args.segment}", "--model.positional.kind=rope", "--model.attention.kernel=sdpa",
        f"--train.seq_len={args.seq_len}", f"--train.batch_size={args.batch}", f"--train.max_steps={args.steps}",
        "--train.max_minutes=null", "--train.warmup_steps=20", f"--train.eval_every={args.steps}", "--train.eval_batches=2",
        "--train.log_every=25", "--train.dtype=float32", "--train.samples=0", f"--train.seed={args.seed}",
        f"--train.out_dir={out}", *extra,
    ])


def windows(val, args):  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    g = np.random.default_rng(20261207)
    starts = g.integers(0, len(val) - args.eval_len - 1, size=args.windows)
    x = torch.stack([torch.from_numpy(val[s : s + args.eval_len].astype("int64")) for s in starts])
    y = torch.stack([torch.from_numpy(val[s + 1 : s + 1 + args.eval_len].astype("int64")) for s in starts])
    return x, y


def scored_loss(model, x, y, scored: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean loss (nats/token) on the last `scored` tokens of each window, and the seconds the
    forward passes took (one window at a time)."""
    import torch
    import torch.nn.functional as F

    total, seconds = 0.0, 0.0
    with torch.no_grad():
        for row in range(x.shape[0]):
            t0 = time.perf_counter()
            logits = model(x[row : row + 1])
            seconds += time.perf_counter() - t0
            total += float(F.cross_entropy(logits[0, -scored:].float(), y[row, -scored:]))
    return total / x.shape[0], seconds


def with_memory(cfg, weights, **options):  # type: ignore[no-untyped-def]
    """The trained model rebuilt with other memory options (not weights), weights loaded."""
    import dataclasses

    from anyformer.models import build_model

    memory = dataclasses.replace(cfg.model.memory, options={**cfg.model.memory.options, **options})
    model = build_model(dataclasses.replace(cfg.model, memory=memory)).eval()
    model.load_state_dict(weights)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--train-memory", type=int, default=4096)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=20480)
    p.add_argument("--scored", type=int, default=4096)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--memories", default="0,1024,4096,16384")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated variants to train (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from anyformer.tasks import TASKS
    from anyformer.training import Trainer
    from anyformer.training.run import load_run

    torch.set_num_threads(torch.get_num_threads())
    result: dict = {"processor": processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "args": vars(args), "models": {}}
    chosen = variants(args)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    root = Path(tempfile.mkdtemp(prefix="bench_knn_"))
    x = y = None
    for name, extra in chosen.items():
        cfg = run_config(args, extra, root / name)
        t0 = time.perf_counter()
        fit = Trainer(cfg, run_dir=root / name, verbose=False).fit()
        train_s = time.perf_counter() - t0
        run = load_run(root / name, "latest", device="cpu")
        if x is None:
            data = TASKS.get("causal_lm")(cfg).prepare(None)
            assert data.tokenizer.encode("\x1e") == [1], "boundary_token=1 must be DOCUMENT_START's id"
            x, y = windows(data.val, args)
        params = sum(t.numel() for t in run.model.parameters())
        entry: dict = {"params": params, "train_seconds": round(train_s, 1), "final_train_loss": round(fit.losses[-1], 4)}
        if name == "knn":
            weights = run.model.state_dict()
            base_loss, base_s = scored_loss(with_memory(run.cfg, weights, memory_size=0), x, y, args.scored)
            entry["by_memory"] = {}
            for size in [int(s) for s in args.memories.split(",")]:
                loss, secs = (base_loss, base_s) if size == 0 else scored_loss(with_memory(run.cfg, weights, memory_size=size), x, y, args.scored)
                entry["by_memory"][str(size)] = {"loss": round(loss, 4), "seconds": round(secs, 2),
                                                 "retrieval_share": round(1 - base_s / secs, 3) if size else 0.0}
                print(f"knn memory {size:6d}: loss {loss:.4f} nats/token, {secs:.1f} s", file=sys.stderr)
            biggest = max(int(s) for s in args.memories.split(","))
            try:
                for search in ("flat", "hnsw"):
                    loss, secs = scored_loss(with_memory(run.cfg, weights, memory_size=biggest, search=search), x, y, args.scored)
                    entry[f"search_{search}_{biggest}"] = {"loss": round(loss, 4), "seconds": round(secs, 2)}
                    print(f"knn memory {biggest} {search}: loss {loss:.4f}, {secs:.1f} s", file=sys.stderr)
            except Exception as e:  # faiss missing
                entry["search_faiss"] = f"not measured: {e}"
        else:
            loss, secs = scored_loss(run.model, x, y, args.scored)
            entry.update(loss=round(loss, 4), seconds=round(secs, 2))
        print(f"{name}: {entry}", file=sys.stderr)
        result["models"][name] = entry
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
