"""The fast batch-1 decoding step (the model's own modules with the native GEMV and one-query
attention primitives, `FastLinears`): its logits equal the uncached forward within fp32
rounding over norms, feed-forwards, positional encodings and head layouts, and generation
through it equals the plain module path for every kind of model, batches, padding and rolling
caches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from anyformer import build_model
from anyformer.generation import generate
from anyformer.generation.fast import FastLinears, native_gemv
from anyformer.models.presets import preset

pytestmark = pytest.mark.skipif(native_gemv() is None, reason="the C++ kernels need a C++ toolchain and an AVX-512 BF16 CPU")

GQA_SWIGLU = dict(num_heads=4, num_kv_heads=2)
CASES: dict[str, dict[str, Any]] = {
    "gpt2": {"base": "gpt2-tiny"},
    "llama": {"base": "llama-tiny"},
    "partial-rope-layernorm-gelu-mlp": {
        "base": "llama-tiny", "positional": {"kind": "rope", "options": {"fraction": 0.5, "base": 500.0}},
        "norm": {"kind": "layernorm", "eps": 1e-5, "bias": False}, "ffn": {"kind": "mlp", "activation": "gelu", "hidden_dim": 96},
    },
    "interleaved-rope-mqa-geglu-bias": {
        "base": "llama-tiny", "positional": {"kind": "rope", "options": {"interleaved": True}},
        "attention": {"num_heads": 4, "num_kv_heads": 1, "bias": True, "out_bias": False},
        "ffn": {"kind": "geglu", "hidden_dim": 80, "bias": True},
    },
    "sinusoidal-relu-untied-scaled": {
        "base": "gpt2-tiny", "positional": {"kind": "sinusoidal"}, "ffn": {"kind": "mlp", "activation": "relu"},
        "tie_embeddings": False, "attention": {"num_heads": 2, "scale": 0.3},
    },
    "no-positions-silu-no-final-norm": {
        "base": "llama-tiny", "positional": {"kind": "none"}, "ffn": {"kind": "mlp", "activation": "silu", "hidden_dim": 64},
        "final_norm": False,
    },
}


def _model(case: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    spec = dict(CASES[case])
    torch.manual_seed(0)
    model = build_model(preset(spec.pop("base"), **spec)).eval()
    with torch.no_grad():  # larger weights than the init, so that errors would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def _steps(model: torch.nn.Module, tokens: Tensor, prefill: int) -> Tensor:
    """Teacher-forced step logits (steps, V) after a prefill, through the module step with
    FastLinears over a float32 cache."""
    cache = model.make_cache(1, tokens.shape[1], dtype=torch.float32)
    with torch.inference_mode():
        model(tokens[:, :prefill], cache)
        rows = []
        with FastLinears(model):
            for i in range(prefill, tokens.shape[1]):
                rows.append(model(tokens[:, i : i + 1], cache)[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_matches_uncached_forward(case: str) -> None:
    """An independent reference: each step's logits are those of the whole sequence recomputed
    without a cache by the plain modules (PyTorch attention kernels)."""
    model = _model(case)
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(tokens)[0, 6:]  # (14, V): the logits at positions 6..19
    got = _steps(model, tokens, 6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_bf16_generation_equals_the_plain_path(case: str) -> None:
    """bf16 weights: the GEMV accumulates in fp32 and rounds once, as F.linear does, and the
    fp32 cache holds bf16 keys exactly, so greedy tokens equal the plain bf16 path's."""
    model = _model(case, torch.bfloat16)
    prompt = [3, 9, 27, 81, 243]
    assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=True), generate(model, prompt, max_new_tokens=12, compile=False))


@pytest.mark.parametrize("kernel", ["eager", "chunked"])
def test_fast_step_serves_every_exact_kernel(kernel: str) -> None:
    model = build_model(preset("llama-tiny", attention={**GQA_SWIGLU, "kernel": kernel})).eval()
    prompt = [3, 9, 27, 81, 243]
    assert torch.equal(generate(model, prompt, max_new_tokens=15, compile=True), generate(model, prompt, max_new_tokens=15, compile=False))


KINDS = {
    "alibi": dict(base="llama-tiny", positional={"kind": "alibi"}),
    "sliding-window": dict(base="llama-tiny", attention={**GQA_SWIGLU, "kind": "sliding_window", "options": {"window": 4}}),
    "qk-norm": dict(base="llama-tiny", attention={**GQA_SWIGLU, "qk_norm": "rmsnorm"}),
    "post-norm": dict(base="gpt2-tiny", norm={"kind": "layernorm", "placement": "post"}),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_other_kinds_decode_through_the_fast_step_as_through_the_plain_one(name: str) -> None:
    spec = dict(KINDS[name])
    torch.manual_seed(0)
    model = build_model(preset(spec.pop("base"), **spec)).eval()
    prompt = [3, 9, 27, 81, 243]
    assert torch.equal(generate(model, prompt, max_new_tokens=10, compile=True), generate(model, prompt, max_new_tokens=10, compile=False))


def test_batches_rolling_caches_and_padding_equal_the_plain_path() -> None:
    model = build_model(preset("llama-tiny")).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]  # left-padded batch
    assert torch.equal(generate(model, prompts, max_new_tokens=12, compile=True), generate(model, prompts, max_new_tokens=12, compile=False))
    rolled = generate(model, [5, 6, 7], max_new_tokens=40, window=8, sink_tokens=2, compile=True)
    assert torch.equal(rolled, generate(model, [5, 6, 7], max_new_tokens=40, window=8, sink_tokens=2, compile=False))


def test_full_cache_raises_a_clear_error() -> None:
    model = build_model(preset("gpt2-tiny")).eval()
    cache = model.make_cache(1, 4, dtype=torch.float32)
    with torch.inference_mode(), FastLinears(model):
        model(torch.tensor([[1, 2, 3]]), cache)
        model(torch.tensor([[4]]), cache)
        with pytest.raises(ValueError, match="cache holds 4 positions"):
            model(torch.tensor([[5]]), cache)
