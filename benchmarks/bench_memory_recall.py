"""Memory across segments on a task a segmented model cannot solve: recall a fact stated
segments ago.

    python benchmarks/bench_memory_recall.py --out benchmarks/results/memory_recall.json

Each sequence holds `--facts` key/value pairs (distinct keys of 16, values of 16) in its first
segment, then `gap` segments of random filler tokens, then a last segment of filler ending in
every key asked once in a new order, each followed by its value: the model must produce the
value after its key (the loss and the accuracy count those positions only). Every segment has
`--segment` tokens; the model reads one segment at a time (its context is the segment plus
the memory), so the facts are `gap + 1` segments before the questions.

Models of the same size and segment length are trained the same way (AdamW, the same
steps, loss on the answers only; in the first third of the steps every batch is one segment,
the questions beside the facts, which teaches the look-up itself; after that each batch has 1
to `--max-gap` + 2 segments, drawn uniformly): the Recurrent
Memory Transformer (`--memory` tokens, full backpropagation through the segments), the
∞-former (a continuous memory of `--basis` basis functions per layer), the kNN memory (`--models
knn`: the last layer retrieves the `--top-k` best keys of every earlier segment) and the segmented plain
model (no memory: chance level, 1/16, is all it can reach). Another model of the same size
reads the whole sequence with sliding-window attention over the last `--segment` tokens (its
reach is layers x segment tokens back, a fixed horizon). Reported: held-out
accuracy per gap (fixed seeds, `--eval` sequences each) and training time. The cost per token
against the length is measured by bench_long_context_decode.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

KEYS, VALUES, FILLER = range(1, 17), range(17, 33), range(33, 64)


def batch(n: int, segments: int, seg: int, facts: int, g):  # type: ignore[no-untyped-def]
    """(tokens (n, L), targets (n, L)): the facts open the first segment, the last segment ends
    with every key asked once (in a new order), each followed by its value; targets are -100
    except at the answers' positions (the position before each value predicts it)."""
    import torch

    length = segments * seg
    tokens = torch.randint(FILLER.start, FILLER.stop, (n, length), generator=g)
    keys = torch.stack([torch.randperm(16, generator=g)[:facts] for _ in range(n)]) + KEYS.start  # (n, facts)
    values = torch.randint(VALUES.start, VALUES.stop, (n, facts), generator=g)
    tokens[:, 0 : 2 * facts : 2], tokens[:, 1 : 2 * facts : 2] = keys, values
    order = torch.stack([torch.randperm(facts, generator=g) for _ in range(n)])  # (n, facts)
    rows = torch.arange(n)[:, None]
    start = length - 2 * facts
    tokens[:, start::2], tokens[:, start + 1 :: 2] = keys[rows, order], values[rows, order]
    targets = torch.full_like(tokens, -100)
    targets[:, start : length : 2] = values[rows, order]  # predicted at the query key's position
    return tokens, targets


def make(kind: str, memory: int, seg: int, dim: int, layers: int, longest: int):  # type: ignore[no-untyped-def]
    """kind rmt / infinite_former / knn (a memory around the decoder, reading one segment at a time), or
    sliding_window: the same decoder reading the whole sequence, each query attending to the
    `seg` most recent tokens (itself included)."""
    from anyformer.config import ModelConfig, from_dict
    from anyformer.models import build_model

    base = dict(arch="decoder", vocab_size=64, dim=dim, num_layers=layers, attention=dict(num_heads=4), positional=dict(kind="rope"))
    if kind == "sliding_window":
        base.update(max_seq_len=longest, attention=dict(kind="sliding_window", num_heads=4, options=dict(window=seg)))
    elif kind == "knn":  # the memory holds every earlier segment; the last layer retrieves `memory` entries per query
        base.update(max_seq_len=seg, memory=dict(kind="knn", options=dict(segment_len=seg, memory_size=longest, top_k=memory)))
    else:
        options = dict(num_memory=memory, segment_len=seg) if kind == "rmt" else dict(num_basis=memory, segment_len=seg)
        base.update(max_seq_len=seg + 2 * max(memory, 1), memory=dict(kind=kind, options=options))
    return build_model(from_dict(ModelConfig, base).validate())


def train(model, args, g) -> float:  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        # the first third: the questions beside the facts (the look-up itself); then 1 to max_gap + 2 segments
        top = 1 if step < args.steps // 3 else args.max_gap + 2
        segments = int(torch.randint(1, top + 1, (1,), generator=g))
        x, y = batch(args.batch, segments, args.segment, args.facts, g)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        opt.step()
        if step % 200 == 0:
            print(f"  step {step:>5} segments {segments} loss {float(loss.detach()):.3f}", file=sys.stderr)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--memory", type=int, default=8, help="RMT memory tokens")
    p.add_argument("--basis", type=int, default=32, help="∞-former basis functions")
    p.add_argument("--top-k", type=int, default=8, help="entries the kNN memory retrieves per query")
    p.add_argument("--models", default="rmt,infinite_former,segmented,sliding_window")
    p.add_argument("--facts", type=int, default=4)
    p.add_argument("--max-gap", type=int, default=3)
    p.add_argument("--eval-gaps", default="0,1,2,3,6")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args), "threads": torch.get_num_threads(), "models": {}}
    kinds = {"rmt": ("rmt", args.memory), "infinite_former": ("infinite_former", args.basis), "segmented": ("rmt", 0),
             "sliding_window": ("sliding_window", 0), "knn": ("knn", args.top_k)}
    longest = (max(args.max_gap, *(int(x) for x in args.eval_gaps.split(","))) + 2) * args.segment
    for name in args.models.split(","):
        if name not in kinds:
            p.error(f"unknown model {name!r}; choose from {', '.join(kinds)}")
        kind, memory = kinds[name]
        torch.manual_seed(0)
        model = make(kind, memory, args.segment, args.dim, args.layers, longest)
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
        seconds = train(model, args, torch.Generator().manual_seed(1))
        model.eval()
        accuracy = {}
        for gap in (int(x) for x in args.eval_gaps.split(",")):
            x, y = batch(args.eval, gap + 2, args.segment, args.facts, torch.Generator().manual_seed(1000 + gap))
            with torch.no_grad():
                pred = model(x).argmax(-1)
            asked = y != -100
            accuracy[gap] = float((pred[asked] == y[asked]).float().mean())
        results["models"][name] = {"kind": kind, "memory": memory, "parameters": sum(p.numel() for p in model.parameters()),
                                   "train_seconds": seconds, "accuracy_by_gap": accuracy}
        print(json.dumps(results["models"][name]), file=sys.stderr)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
