"""State tracking that separates the sequence mixers: composing permutations.

    python benchmarks/bench_state_tracking.py --out benchmarks/results/state_tracking_s5.json
    python benchmarks/bench_state_tracking.py --elements 3 --out benchmarks/results/state_tracking_s3.json

Each token is one of the permutations of `--elements` elements (5: the 120 of S5; 3: the 6 of
S3); the target at position t is the composition of the first t of them (the state after t
moves: the word problem of the group; for S5 not solvable by a fixed-depth softmax Transformer
at every length, the claim the RWKV-7 paper makes for its generalized delta rule).

Decoders of equal width and depth (`--dim`, `--layers`, 4 heads), identical except the sequence mixer: softmax attention (mha, RoPE), linear attention,
RWKV-4 and RWKV-7 (these two order tokens themselves: no positional encoding). Each is trained
with AdamW for `--steps` on sequences of `--train-len` moves (loss at every position), then
scored on fresh sequences of `--eval-len` moves: accuracy at each position, so the curve shows
how far each mixer tracks the state (positions past `--train-len` measure length
generalisation). Writes JSON (accuracy per position, parameters, seconds) and a plot next to
it. Records the processor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from machine import processor  # benchmarks/machine.py

import torch
import torch.nn.functional as F



def group(elements: int) -> torch.Tensor:
    """The composition table of the permutations of `elements` (token i: the i-th permutation in
    lexicographic order): table[a, b] is the token of "b after a", (p_b o p_a)(x) = p_b[p_a[x]]."""
    perms = list(itertools.permutations(range(elements)))
    index = {p: i for i, p in enumerate(perms)}
    return torch.tensor([[index[tuple(pb[pa[x]] for x in range(elements))] for pb in perms] for pa in perms])

MIXERS = {
    "mha": {"attention": {"kind": "mha", "num_heads": 4}, "positional": {"kind": "rope"}},
    "linear": {"attention": {"kind": "linear", "num_heads": 4}, "positional": {"kind": "rope"}},
    "rwkv4": {"attention": {"kind": "rwkv4", "num_heads": 4}, "positional": {"kind": "none"}},
    "rwkv7": {"attention": {"kind": "rwkv7", "num_heads": 4}, "positional": {"kind": "none"}},
}


def batch(table: torch.Tensor, n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves (n, length) and the state after each (n, length), composed step by step by `table`."""
    moves = torch.randint(0, table.shape[0], (n, length), generator=g)
    states = torch.empty_like(moves)
    state = moves[:, 0]
    states[:, 0] = state
    for t in range(1, length):
        state = table[state, moves[:, t]]
        states[:, t] = state
    return moves, states


def model_for(mixer: str, args):  # type: ignore[no-untyped-def]
    from anyformer.config import ModelConfig, from_dict
    from anyformer.models import build_model

    cfg = dict(arch="decoder", vocab_size=math.factorial(args.elements), dim=args.dim, num_layers=args.layers, max_seq_len=max(args.eval_len, args.train_len),
               ffn=dict(kind="swiglu", hidden_mult=2.0), **MIXERS[mixer])
    return build_model(from_dict(ModelConfig, cfg).validate())


def train_and_score(mixer: str, args) -> dict:  # type: ignore[no-untyped-def]
    torch.manual_seed(args.seed)
    model = model_for(mixer, args)
    table = group(args.elements)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        x, y = batch(table, args.batch, args.train_len, g)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.log_every and step % args.log_every == 0:
            print(f"  {mixer} step {step} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    hits = torch.zeros(args.eval_len)
    eg = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y = batch(table, 256, args.eval_len, eg)
            hits += (model(x).argmax(-1) == y).float().sum(0)
    acc = (hits / (256 * args.eval_batches)).tolist()
    return {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
            "final_loss": round(loss.item(), 4), "accuracy_by_position": [round(a, 4) for a in acc]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in result["mixers"].items():
        acc = r["accuracy_by_position"]
        ax.plot(range(1, len(acc) + 1), acc, label=f"{name} ({r['params'] / 1e3:.0f}k params)")
    ax.axvline(result["args"]["train_len"], color="grey", linestyle=":", label="trained length")
    ax.axhline(1 / math.factorial(result["args"]["elements"]), color="black", linewidth=0.5, linestyle="--", label="chance")
    ax.set_xlabel("moves composed (position)")
    ax.set_ylabel("accuracy of the state")
    ax.set_title(f"S{result['args']['elements']} permutation composition")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--elements", type=int, default=5, help="permute this many elements (S5: 120 tokens; S3: 6)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-len", type=int, default=32)
    p.add_argument("--eval-len", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result: dict = {"processor": processor(), "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args),
                    "mixers": {}}
    for mixer in args.mixers.split(","):
        result["mixers"][mixer] = r = train_and_score(mixer, args)
        acc = r["accuracy_by_position"]
        t = args.train_len
        print(f"{mixer}: {r['params']} params, {r['train_seconds']} s; accuracy at positions 1-8 {sum(acc[:8]) / 8:.3f}, "
              f"{t - 7}-{t} {sum(acc[t - 8:t]) / 8:.3f}, last 8 {sum(acc[-8:]) / 8:.3f}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    if args.out:
        plot(result, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
