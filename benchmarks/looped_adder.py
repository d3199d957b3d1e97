"""The hand-written looped adder (anyformer/convert/looped_adder.py): the fraction of random
pairs of BITS-bit numbers added exactly, against the loop count, beside the fraction whose
longest carry chain the loops cover (what the carry-save iteration predicts: the two curves
should be one). Prints a table and writes a PNG.

    python benchmarks/looped_adder.py --bits 64 --pairs 500 --out docs/theory/adder_loops.png
"""

from __future__ import annotations

import argparse
import random

import torch

from anyformer.convert.looped_adder import adder_tokens, build_adder


def steps_needed(a: int, b: int) -> int:
    """Carry-save rounds until no carry is left (0 when a and b share no set bit)."""
    s, c, k = a ^ b, a & b, 0
    while c:
        s, c, k = s ^ (c << 1), s & (c << 1), k + 1
    return k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--pairs", type=int, default=500)
    p.add_argument("--max-loops", type=int, default=None, help="default: bits + 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG of the curves")
    args = p.parse_args()
    rng = random.Random(args.seed)
    pairs = [(rng.getrandbits(args.bits) | 1 << (args.bits - 1), rng.getrandbits(args.bits)) for _ in range(args.pairs)]
    tokens = torch.cat([adder_tokens(a, b) for a, b in pairs])  # every a has `bits` digits: one length
    needed = [steps_needed(a, b) for a, b in pairs]
    loops = list(range(1, (args.max_loops or args.bits + 1) + 1))
    exact, covered = [], []
    for k in loops:
        with torch.no_grad():
            bits = build_adder(k)(tokens)[:, 1:].argmax(-1)  # (pairs, digits)
        sums = [sum(bit << i for i, bit in enumerate(row)) for row in bits.tolist()]
        exact.append(sum(s == a + b for s, (a, b) in zip(sums, pairs)) / len(pairs))
        covered.append(sum(n <= k for n in needed) / len(pairs))
    print(f"{args.pairs} random pairs of {args.bits}-bit numbers; longest carry chain: median "
          f"{sorted(needed)[len(needed) // 2]}, max {max(needed)}")
    print("loops  exact  chain covered")
    for k, e, c in zip(loops, exact, covered):
        if k <= 12 or k % 8 == 0 or k == loops[-1]:
            print(f"{k:>5}  {e:.3f}  {c:.3f}")
    assert exact == covered, "the adder disagrees with the carry-save iteration"
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from anyformer.files import save_figure

        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot(loops, exact, lw=2.5, label="added exactly by the model")
        ax.plot(loops, covered, "k--", lw=1, label="longest carry chain <= loops")
        ax.set_xlabel("loops of the one block")
        ax.set_ylabel(f"fraction of {args.pairs} pairs")
        ax.set_title(f"looped adder, random {args.bits}-bit numbers")
        ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
