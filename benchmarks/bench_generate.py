"""Batch-1 decoding speed: anyformer `generate` vs Hugging Face `generate` on the same random
GPT-2-small-shaped weights, fp32 and bf16, greedy, in one run. Prints tokens/s and the ratio
and writes JSON.

    PYTHONPATH=. python benchmarks/bench_generate.py --new-tokens 64 --out bench_generate.json

Decoding at batch 1 on CPU reads every weight once per token (~0.5 GB fp32 for GPT-2 small),
so memory bandwidth bounds the rate; the rest is per-token Python overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

from anyformer.generation import generate
from anyformer.models.builders import build_model
from anyformer.models.presets import preset


def hf_gpt2_to_anyformer(hf: torch.nn.Module, layers: int, dim: int) -> dict[str, torch.Tensor]:
    """Map a GPT2LMHeadModel state dict onto anyformer's GPT-2 module names (benchmark-local;
    the library's converters live in anyformer.convert)."""
    sd = hf.state_dict()
    new = {"embed.tokens.weight": sd["transformer.wte.weight"], "positional.table.weight": sd["transformer.wpe.weight"],
           "lm_head.proj.weight": sd["transformer.wte.weight"],
           "stack.final_norm.weight": sd["transformer.ln_f.weight"], "stack.final_norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(layers):
        p, q = f"transformer.h.{i}.", f"stack.blocks.{i}."
        w, b = sd[p + "attn.c_attn.weight"].t(), sd[p + "attn.c_attn.bias"]  # Conv1D: (in, out)
        for j, name in enumerate("qkv"):
            new[q + f"attn.sublayer.{name}_proj.weight"] = w[dim * j : dim * (j + 1)]
            new[q + f"attn.sublayer.{name}_proj.bias"] = b[dim * j : dim * (j + 1)]
        pairs = {"attn.c_proj": "attn.sublayer.o_proj", "mlp.c_fc": "ffn.sublayer.up", "mlp.c_proj": "ffn.sublayer.down"}
        for a, o in pairs.items():
            new[q + o + ".weight"], new[q + o + ".bias"] = sd[p + a + ".weight"].t(), sd[p + a + ".bias"]
        for a, o in (("ln_1", "attn.norm"), ("ln_2", "ffn.norm")):
            new[q + o + ".weight"], new[q + o + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
    return {k: v.contiguous() for k, v in new.items()}


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Best wall time of `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = build_model(preset("gpt2-small")).eval()
    ours.load_state_dict(hf_gpt2_to_anyformer(hf, 12, 768), strict=True)
    prompt = torch.randint(1, 50257, (1, args.prompt_len))
    n = args.new_tokens
    results = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        hf.to(dtype), ours.to(dtype)

        def run_hf() -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, eos_token_id=None, pad_token_id=0)

        def run_ours() -> torch.Tensor:
            return generate(ours, prompt, max_new_tokens=n)

        same = torch.equal(run_hf(), run_ours())
        t_hf, t_ours = timed(run_hf, args.repeats), timed(run_ours, args.repeats)
        row = {"dtype": name, "new_tokens": n, "prompt_len": args.prompt_len,
               "hf_tokens_per_s": n / t_hf, "anyformer_tokens_per_s": n / t_ours, "ratio": t_hf / t_ours,
               "same_tokens": same}
        results.append(row)
        print(f"{name:9s} HF {row['hf_tokens_per_s']:7.1f} tok/s  anyformer {row['anyformer_tokens_per_s']:7.1f} tok/s  "
              f"ratio {row['ratio']:.2f}x  same tokens: {same}")
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine()}
    with open(args.out, "w") as f:
        json.dump({"model": "gpt2-small (random weights)", "batch": 1, "env": info, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
