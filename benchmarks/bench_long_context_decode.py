"""Time and memory per generated token against context length, for the long-context methods.

    python benchmarks/bench_long_context_decode.py --out benchmarks/results/long_context_decode.json

One small decoder size for every method (width `--dim`, `--layers` layers, random weights: the
cost does not depend on what the weights learned), generating after contexts of growing length:

- plain: a decoder with an ordinary KV cache (its max_seq_len raised to the longest context);
- lm_infinite: the same decoder with LM-Infinite (window `--window`, 10 global tokens): a Λ cache;
- rmt: memory tokens (`--segment` tokens per segment, 8 memory tokens);
- infinite_former: a continuous memory (`--segment`, 32 basis functions per layer);
- megabyte: patches of 8 (the global model's cache grows by one position per patch);
- rwkv7, rwkv4: RWKV time mixing (4 heads for RWKV-7) with no positional encoding, decoding
  with a constant-size state per layer;
- hierarchical: H-Transformer-1D attention (blocks of 16) over an ordinary KV cache: each step
  scores its own block and one pooled block per level, reading the whole cache to pool it;
- sliding_window: sliding-window attention over the last `--window` tokens, decoding through a
  rolling cache of the last `--window` keys (no sinks; RoPE depends on distances only, so
  slot positions give the same logits).

For each context length L the context is fed through the model's cache (the model protocol's
decode_step, in chunks), then `--tokens` single-token steps are timed; reported: milliseconds
per token (median of the steps), the bytes the decoding state holds (every tensor of the
cache, the model cache's per-position bookkeeping of 9 bytes a token included) and the bytes of
the layers' own states (`layer_state_bytes`). Flat columns are what the method claims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def state_bytes(obj, seen=None) -> int:  # type: ignore[no-untyped-def]
    """Bytes of every tensor reachable from a cache object (modules, lists, attributes)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(state_bytes(x, seen) for x in obj.values())
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "__dict__"):
        return sum(state_bytes(x, seen) for k, x in vars(obj).items() if not k.startswith("make") and k != "_parameters")
    return 0


def build(method: str, args, longest: int):  # type: ignore[no-untyped-def]
    from anyformer.config import ModelConfig, from_dict
    from anyformer.longcontext import apply_lm_infinite
    from anyformer.models import build_model

    base = dict(arch="decoder", vocab_size=256, dim=args.dim, num_layers=args.layers, attention=dict(num_heads=4),
                positional=dict(kind="rope"), max_seq_len=longest + args.tokens + 8)
    if method == "rmt":
        base.update(max_seq_len=args.segment + 16, memory=dict(kind="rmt", options=dict(num_memory=8, segment_len=args.segment)))
    elif method == "infinite_former":
        base.update(max_seq_len=args.segment, memory=dict(kind="infinite_former", options=dict(segment_len=args.segment, num_basis=32)))
    elif method == "megabyte":
        size = -(-(longest + args.tokens + 8) // 8) * 8
        base.update(arch="megabyte", max_seq_len=size, options=dict(patch_size=8, local_dim=args.dim // 2, local_layers=2))
    elif method == "lm_infinite":
        base.update(max_seq_len=args.window)
    elif method in ("rwkv7", "rwkv4"):
        base.update(attention=dict(kind=method, num_heads=4), positional=dict(kind="none"))
    elif method == "hierarchical":
        base.update(attention=dict(kind="hierarchical", num_heads=4))
    elif method == "sliding_window":
        base.update(max_seq_len=args.window, attention=dict(kind="sliding_window", num_heads=4, options=dict(window=args.window)))
    model = build_model(from_dict(ModelConfig, base).validate()).eval()
    if method == "lm_infinite":
        apply_lm_infinite(model, window=args.window, num_global=10)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--methods", default="plain,lm_infinite,rmt,infinite_former,megabyte,sliding_window,rwkv7,rwkv4")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=256, help="context tokens per decode_step call while reading it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict = {"args": vars(args), "threads": torch.get_num_threads(), "rows": []}
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = build(method, args, max(lengths))
        for length in lengths:
            g = torch.Generator().manual_seed(length)
            context = torch.randint(0, 256, (1, length), generator=g)
            with torch.no_grad():
                lc = model.decoding_info().long_context
                if lc:
                    cache = model.make_cache(1, window=lc.window, sinks=lc.sinks, true_positions=True)
                elif method == "sliding_window":
                    cache = model.make_cache(1, window=args.window, sinks=0)
                else:
                    cache = model.make_cache(1, length + args.tokens + 8)
                chunk = min(args.chunk, args.window) if lc or method == "sliding_window" else args.chunk
                start = time.perf_counter()
                for s in range(0, length, chunk):
                    part = context[:, s : s + chunk]
                    logits = model.decode_step(part, cache, cache.next_positions(torch.ones_like(part, dtype=torch.bool)))
                read = time.perf_counter() - start
                token = logits[:, -1:].argmax(-1)
                times = []
                for _ in range(args.tokens):
                    start = time.perf_counter()
                    logits = model.decode_step(token, cache, cache.next_positions(torch.ones_like(token, dtype=torch.bool)))
                    times.append(time.perf_counter() - start)
                    token = logits[:, -1:].argmax(-1)
            row = {"method": method, "context": length, "ms_per_token": 1000 * statistics.median(times),
                   "state_bytes": state_bytes(cache), "layer_state_bytes": state_bytes(list(getattr(cache, "layers", []))),
                   "read_context_s": read}
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
