"""Training throughput of anyformer against Hugging Face GPT2LMHeadModel, same shapes, same run.

For each shape (GPT-2 small; nanoGPT's Shakespeare model: 6 layers, width 384, 6 heads,
context 256) and each precision (fp32; bf16 autocast), both models train a few AdamW steps
after warmup on the same random batch; the timing rounds alternate between the two so that
machine load affects both alike. Prints tokens/s and the ratio, writes JSON.

    python benchmarks/bench_train.py --out bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import anyformer  # noqa: F401  (sets the OpenMP wait policy before torch spins up threads)
from anyformer.config import from_dict, ModelConfig
from anyformer.models.builders import build_model

SHAPES = {
    "gpt2-small": dict(layers=12, dim=768, heads=12, vocab=50257, ctx=1024),
    "nanogpt-shakespeare": dict(layers=6, dim=384, heads=6, vocab=65, ctx=256),
}
BATCH = {"gpt2-small": 1, "nanogpt-shakespeare": 8}  # sequences per step (CPU-sized; --batch overrides)


def anyformer_gpt2(layers: int, dim: int, heads: int, vocab: int, ctx: int) -> torch.nn.Module:
    """anyformer's GPT-2 layout: learned positions, pre-LayerNorm, GELU(tanh) MLP, biases, tied head."""
    cfg = from_dict(ModelConfig, dict(
        arch="decoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, bias=True, kernel="sdpa"), positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=1e-5), ffn=dict(kind="mlp", activation="gelu_tanh", bias=True, hidden_mult=4.0),
        tie_embeddings=True,
    ))
    return build_model(cfg)


def hf_gpt2(layers: int, dim: int, heads: int, vocab: int, ctx: int) -> torch.nn.Module:
    """transformers.GPT2LMHeadModel with the same shape, no dropout, SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=ctx,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def make_step(model: torch.nn.Module, hf: bool, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """A closure doing one forward, loss, backward and AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> float:
        with torch.autocast("cpu" if x.device.type == "cpu" else "cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench(shape: str, dtype_name: str, batch: int, seq_len: int, steps: int, rounds: int, device: str) -> dict:
    """Tokens/s of both implementations (median over alternating rounds)."""
    s = SHAPES[shape]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randint(0, s["vocab"], (batch, seq_len), device=device)
    impls = {"anyformer": make_step(anyformer_gpt2(**s).to(device), False, dtype),
             "hf": make_step(hf_gpt2(**s).to(device), True, dtype)}
    for step in impls.values():  # warmup
        step(x)
        step(x)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(rounds):
        for name, step in impls.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(x)
            if device != "cpu":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    tok = {k: batch * seq_len / statistics.median(v) for k, v in times.items()}
    return {"shape": shape, "dtype": dtype_name, "batch": batch, "seq_len": seq_len, "tokens_per_s": tok,
            "ratio_anyformer_over_hf": tok["anyformer"] / tok["hf"]}


def main() -> None:
    """Run every shape x precision and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_train.json")
    ap.add_argument("--steps", type=int, default=1, help="steps per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: per shape)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            r = bench(shape, dtype, args.batch or BATCH[shape], args.seq_len, args.steps, args.rounds, args.device)
            results.append(r)
            t = r["tokens_per_s"]
            print(f"{shape:22s} {dtype:5s} anyformer {t['anyformer']:9.0f} tok/s | HF GPT2LMHeadModel {t['hf']:9.0f} tok/s "
                  f"| ratio {r['ratio_anyformer_over_hf']:.3f}", flush=True)
    meta = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg()}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
