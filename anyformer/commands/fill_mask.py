"""`anyformer fill-mask RUN "SEQUENCE"`: a masked language model's predictions for the <mask>
positions of a sequence (a protein run: residue letters with <mask> where unknown)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `fill-mask` subcommand."""
    p = subparsers.add_parser("fill-mask", help="predict the <mask> positions of a sequence with a masked LM run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task masked_lm")
    p.add_argument("sequence", help='residues with <mask> where a prediction is wanted, e.g. "MKT<mask>AYIAKQR"')
    p.add_argument("--top", type=int, default=5, help="predictions shown per position (default 5)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print, per <mask>, the most likely tokens and their probabilities, then the sequence
    with every <mask> filled by its most likely residue."""
    import torch

    from ..training.run import load_run

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    r = load_run(args.run_dir, args.checkpoint, args.device)
    if r.cfg.task.kind != "masked_lm":
        raise ValueError(f"{args.run_dir} was trained for task {r.cfg.task.kind!r}; fill-mask needs a masked_lm run")
    tok = r.tokenizer
    body = tok.encode(args.sequence)  # type: ignore[attr-defined]
    masks = [i for i, t in enumerate(body) if t == tok.mask_id]  # type: ignore[attr-defined]
    if not masks:
        raise ValueError("the sequence has no <mask>; put <mask> where a residue should be predicted")
    ids = [tok.cls_id, *body, tok.eos_id]  # type: ignore[attr-defined]
    if len(ids) > r.cfg.model.max_seq_len:
        raise ValueError(f"the sequence has {len(body)} tokens; this model reads at most {r.cfg.model.max_seq_len - 2}")
    device = next(r.model.parameters()).device
    with torch.no_grad():
        probs = r.model(torch.tensor([ids], device=device)).float().softmax(-1)[0]  # (n, V)
    filled = list(body)
    for i in masks:
        p = probs[i + 1]
        top = p.topk(min(args.top, p.numel()))
        shown = "  ".join(f"{tok.decode([int(j)])} {float(v):.3f}" for v, j in zip(top.values, top.indices))
        print(f"position {i + 1:>4}: {shown}")
        residues = [j for j in p.argsort(descending=True).tolist() if j in tok.standard_ids or tok.tokens[j] in "XBUZO"]  # type: ignore[attr-defined]
        filled[i] = residues[0]
    print(f"filled         {tok.decode(filled)}")
    return 0
