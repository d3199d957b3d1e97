"""Masked diffusion against the causal decoder on Shakespeare: generation time against the number
of unmasking steps, the quality of the drafts, and infilling.

    python benchmarks/bench_diffusion.py --diffusion runs/shakespeare-diffusion --causal runs/shakespeare-char \
        --out benchmarks/results/diffusion_shakespeare.json

Both runs are char-level models of the same size trained for the same time (configs
shakespeare-diffusion.yaml and the default shakespeare-char config). In one process:

1. Generation: `--tokens` new characters after a newline, for each number of steps in
   `--steps` (orders `--orders`; with --edit for three of them), timed (median of `--repeats`), and the causal
   decoder's KV-cached sampling of as many characters, timed the same way. Each sample's quality
   is judged by the causal decoder: its mean next-character loss on the sample (lower = more
   plausible to it; the decoder judging its own samples favours them, so the causal row is a
   reference, not a competitor), over `--samples` samples per setting at temperature 1.
2. Infilling: held-out passages (fixed seeds) with a gap of `--gap` characters between
   `--side` characters on each side. The diffusion model fills the gap from both sides; the
   causal decoder can only continue the left side (greedy). Reported: the share of gap
   characters equal to the original, and the causal decoder's loss on the whole passage with the
   gap filled (does the fill connect to the right side?).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def judge(causal, ids: list[int]) -> float:  # type: ignore[no-untyped-def]
    """The causal decoder's mean next-token loss on `ids` (nats)."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = causal(x[:, :-1]).float()
    return float(F.cross_entropy(logits[0], x[0, 1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion", required=True, help="a masked_diffusion run folder")
    p.add_argument("--causal", required=True, help="a causal_lm run folder with the same tokenizer")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--steps", default="8,16,32,64,128,200")
    p.add_argument("--orders", default="confidence,random", help="unmasking orders to measure (edits are measured with confidence)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--side", type=int, default=80)
    p.add_argument("--gap", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from anyformer.generation import GenerationConfig, generate
    from anyformer.generation.diffusion import DiffusionConfig, diffusion_fill, diffusion_generate
    from anyformer.tasks import TASKS
    from anyformer.distributed import DistEnv
    from anyformer.training.run import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    d, c = load_run(args.diffusion), load_run(args.causal)
    tok = d.tokenizer
    if [tok.decode([i]) for i in range(tok.vocab_size)] != [c.tokenizer.decode([i]) for i in range(c.tokenizer.vocab_size)]:
        raise SystemExit("the two runs have different tokenizers; train both on the same corpus with the same tokenizer")
    mask_id, context = tok.vocab_size, d.cfg.model.max_seq_len
    prompt = tok.encode("\n")
    results: dict = {"threads": torch.get_num_threads(), "tokens": args.tokens, "generation": [], "infilling": {}}

    def timed(fn):  # type: ignore[no-untyped-def]
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    steps_list = [int(x) for x in args.steps.split(",")]
    settings = [(order, n, False) for order in args.orders.split(",") for n in steps_list]
    settings += [("confidence", n, True) for n in steps_list[1:4]]
    for order, steps, edit in settings:
        config = DiffusionConfig(steps=steps, temperature=1.0, order=order, edit=edit, seed=0)
        seconds, _ = timed(lambda: diffusion_generate(d.model, prompt, args.tokens, mask_id, context, config))
        losses, texts = [], []
        for i in range(args.samples):
            sample = DiffusionConfig(steps=steps, order=order, edit=edit, seed=100 + i)
            new = diffusion_generate(d.model, prompt, args.tokens, mask_id, context, sample)
            losses.append(judge(c.model, prompt + new))
            texts.append(tok.decode(new))
        row = {"model": "diffusion", "order": order, "steps": steps, "edit": edit, "seconds": seconds,
               "chars_per_s": args.tokens / seconds, "judge_loss": statistics.mean(losses), "sample": texts[0]}
        results["generation"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sample"}), file=sys.stderr)
    gen = GenerationConfig(max_new_tokens=args.tokens, do_sample=True, temperature=1.0, seed=0)
    seconds, _ = timed(lambda: generate(c.model, [prompt], gen))
    losses, texts = [], []
    for i in range(args.samples):
        new = generate(c.model, [prompt], GenerationConfig(max_new_tokens=args.tokens, do_sample=True, temperature=1.0, seed=100 + i))[0, len(prompt):].tolist()
        losses.append(judge(c.model, prompt + new))
        texts.append(tok.decode(new))
    row = {"model": "causal (KV cache)", "order": "left_to_right", "steps": args.tokens, "edit": False, "seconds": seconds, "chars_per_s": args.tokens / seconds,
           "judge_loss": statistics.mean(losses), "sample": texts[0]}
    results["generation"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "sample"}), file=sys.stderr)

    task = TASKS.get(d.cfg.task.kind)(d.cfg)
    val = task.prepare(DistEnv(0, 1, 0, torch.device("cpu"))).val
    g = torch.Generator().manual_seed(7)
    span = 2 * args.side + args.gap
    hits = {"diffusion": 0, "causal": 0}
    judged = {"diffusion": [], "causal": [], "original": []}
    examples = []
    for k in range(args.passages):
        start = int(torch.randint(0, len(val) - span, (1,), generator=g))
        ids = [int(t) for t in val[start : start + span]]
        left, truth, right = ids[: args.side], ids[args.side : args.side + args.gap], ids[args.side + args.gap :]
        x = torch.tensor([left + [mask_id] * args.gap + right])
        fill = x == mask_id
        filled = diffusion_fill(d.model, x, fill, mask_id, DiffusionConfig(steps=args.gap, temperature=0))[0, args.side : args.side + args.gap].tolist()
        cont = generate(c.model, [left], GenerationConfig(max_new_tokens=args.gap, do_sample=False))[0, args.side :].tolist()
        hits["diffusion"] += sum(a == b for a, b in zip(filled, truth))
        hits["causal"] += sum(a == b for a, b in zip(cont, truth))
        judged["diffusion"].append(judge(c.model, left + filled + right))
        judged["causal"].append(judge(c.model, left + cont + right))
        judged["original"].append(judge(c.model, ids))
        if k < 4:
            examples.append({"left": tok.decode(left), "right": tok.decode(right), "original": tok.decode(truth),
                             "diffusion": tok.decode(filled), "causal_left_only": tok.decode(cont)})
    n = args.passages * args.gap
    results["infilling"] = {
        "passages": args.passages, "side": args.side, "gap": args.gap,
        "char_accuracy": {m: hits[m] / n for m in hits},
        "judge_loss_whole_passage": {m: statistics.mean(v) for m, v in judged.items()},
        "examples": examples,
    }
    print(json.dumps({k: v for k, v in results["infilling"].items() if k != "examples"}), file=sys.stderr)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
