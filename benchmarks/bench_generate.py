"""Batch-1 decoding speed: anyformer `generate` vs Hugging Face `generate` on the same random
GPT-2-small-shaped weights, fp32 and bf16, greedy, in one run. Prints tokens/s and the ratio
and writes JSON.

    PYTHONPATH=. python benchmarks/bench_generate.py --new-tokens 64 --threads 1,2

Decoding at batch 1 on CPU reads every weight once per token (~0.5 GB fp32 for GPT-2 small),
so memory bandwidth bounds the rate; the rest is per-token Python overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import transformers

from anyformer.convert.hf import model_from_hf
from anyformer.generation import generate


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (the tied embedding
    counted once, as the LM head), minus the position table (one row is read)."""
    skip = {id(model.positional.table.weight)} if hasattr(model.positional, "table") else set()
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def weights_only(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    """The bound on any batch-1 decoder with these weights on this machine: one pass of the
    fast GEMV over every linear layer per token, nothing else (no attention, norms, sampling,
    Python). Returns a callable timing as many passes as `generate` makes tokens."""
    from anyformer.generation.fast import fast_gemv

    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]

    def run(n: int) -> None:
        with torch.inference_mode():
            inputs = {m.in_features: torch.randn(m.in_features, dtype=m.weight.dtype) for m in layers}
            for _ in range(n):
                for m in layers:
                    fast_gemv(inputs[m.in_features], m.weight, m.bias)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; variants alternate within a round, best kept")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--no-compile", action="store_true", help="skip anyformer's default fast path (GenerationConfig.compile)")
    ap.add_argument("--out", default="benchmarks/results/bench_generate_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = model_from_hf(hf.config.to_dict(), hf.state_dict()).eval()  # the library's GPT-2 weight mapping
    prompt = torch.randint(1, 50257, (1, args.prompt_len))
    n = args.new_tokens
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            hf.to(dtype), ours.to(dtype)

            def run_hf() -> torch.Tensor:
                with torch.inference_mode():
                    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, eos_token_id=None, pad_token_id=0)

            # `generate()` as a user calls it (the fast path is the default), and the plain module path
            variants = {"hf": run_hf, "anyformer_plain": lambda: generate(ours, prompt, max_new_tokens=n, compile=False)}
            if not args.no_compile:
                variants["anyformer_default"] = lambda: generate(ours, prompt, max_new_tokens=n)
                bound = weights_only(ours)
                variants["weights_only_bound"] = lambda: bound(n)
            first, outputs = {}, {}
            for key, fn in variants.items():  # first call: warm-up, and compile time for the compiled variant
                t = time.perf_counter()
                outputs[key] = fn()
                first[key] = time.perf_counter() - t
            best = {key: float("inf") for key in variants}
            for _ in range(args.repeats):
                for key, fn in variants.items():
                    t = time.perf_counter()
                    fn()
                    best[key] = min(best[key], time.perf_counter() - t)
            nbytes = weight_bytes_per_token(ours)
            row: dict = {"threads": threads, "dtype": name, "new_tokens": n, "prompt_len": args.prompt_len,
                         "weight_mb_per_token": nbytes / 1e6}
            for key in variants:
                row[f"{key}_tokens_per_s"] = n / best[key]
                row[f"{key}_effective_gb_per_s"] = nbytes * n / best[key] / 1e9
                if key != "hf":
                    row[f"{key}_vs_hf"] = best["hf"] / best[key]
                if key.startswith("anyformer"):
                    row[f"{key}_same_tokens"] = torch.equal(outputs["hf"], outputs[key])
            if "anyformer_default" in variants:
                row["first_call_extra_seconds"] = max(0.0, first["anyformer_default"] - best["anyformer_default"])
            results.append(row)
            line = "  ".join(f"{k.replace('anyformer_', '')} {n / best[k]:6.1f} tok/s" for k in variants)
            ratios = "  ".join(f"{k.replace('anyformer_', '')}/hf {row[f'{k}_vs_hf']:.2f}x same={row[f'{k}_same_tokens']}"
                               for k in variants if k.startswith("anyformer"))
            print(f"threads={threads} {name:9s} {line}  {ratios}", flush=True)
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": "gpt2-small (random weights)", "batch": 1, "env": info, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
