"""The whole batch-1 decoding step in C++ (anyformer.models.native_step): the logits of the
Python module step bit for bit, the uncached forward within fp32 rounding, over norms, feed-
forwards, positional encodings and head layouts; unsupported models decline and decode through
the module path unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from anyformer import build_model
from anyformer.generation import generate
from anyformer.generation.fast import FastLinears, native_gemv
from anyformer.models.native_step import NativeStep, why_not
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


def _steps(model: torch.nn.Module, tokens: Tensor, prefill: int, native: bool) -> Tensor:
    """Teacher-forced step logits (steps, V) after a prefill, through NativeStep or the module
    path with FastLinears, both over a float32 cache."""
    cache = model.make_cache(1, tokens.shape[1], dtype=torch.float32)
    with torch.inference_mode():
        model(tokens[:, :prefill], cache)
        rows = []
        if native:
            step = NativeStep.create(model, cache)
            assert step is not None, why_not(model, cache)
            for i in range(prefill, tokens.shape[1]):
                rows.append(step(tokens[:, i : i + 1])[0])
        else:
            with FastLinears(model):
                for i in range(prefill, tokens.shape[1]):
                    rows.append(model(tokens[:, i : i + 1], cache)[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_native_step_equals_module_step_bit_for_bit(case: str, dtype: torch.dtype) -> None:
    model = _model(case, dtype)
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_steps(model, tokens, 6, native=True), _steps(model, tokens, 6, native=False))


@pytest.mark.parametrize("case", list(CASES))
def test_native_step_matches_uncached_forward(case: str) -> None:
    """An independent reference: each step's logits are those of the whole sequence recomputed
    without a cache by the plain modules (PyTorch attention kernels)."""
    model = _model(case)
    tokens = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(tokens)[0, 6:]  # (14, V): the logits at positions 6..19
    got = _steps(model, tokens, 6, native=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["eager", "chunked"])
def test_native_step_serves_every_exact_kernel(kernel: str) -> None:
    model = build_model(preset("llama-tiny", attention={**GQA_SWIGLU, "kernel": kernel})).eval()
    prompt = [3, 9, 27, 81, 243]
    assert torch.equal(generate(model, prompt, max_new_tokens=15, compile=True), generate(model, prompt, max_new_tokens=15, compile=False))


DECLINED = {
    "alibi": dict(base="llama-tiny", positional={"kind": "alibi"}),
    "sliding-window": dict(base="llama-tiny", attention={**GQA_SWIGLU, "kind": "sliding_window", "options": {"window": 4}}),
    "qk-norm": dict(base="llama-tiny", attention={**GQA_SWIGLU, "qk_norm": "rmsnorm"}),
    "post-norm": dict(base="gpt2-tiny", norm={"kind": "layernorm", "placement": "post"}),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_unsupported_models_decline_and_decode_through_modules(name: str) -> None:
    spec = dict(DECLINED[name])
    torch.manual_seed(0)
    model = build_model(preset(spec.pop("base"), **spec)).eval()
    cache = model.make_cache(1, 32, dtype=torch.float32)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache)
    assert isinstance(why_not(model, cache), str) and NativeStep.create(model, cache) is None
    prompt = [3, 9, 27, 81, 243]
    assert torch.equal(generate(model, prompt, max_new_tokens=10, compile=True), generate(model, prompt, max_new_tokens=10, compile=False))


def test_batches_rolling_caches_and_padding_decline() -> None:
    model = build_model(preset("llama-tiny")).eval()
    with torch.inference_mode():
        two = model.make_cache(2, 16, dtype=torch.float32)
        model(torch.tensor([[1, 2], [3, 4]]), two)
        assert "batch 1" in why_not(model, two)  # type: ignore[operator]
        padded = model.make_cache(1, 16, dtype=torch.float32)
        model(torch.tensor([[0, 5, 6]]), padded, attention_mask=torch.tensor([[0, 1, 1]]))
        assert "padded" in why_not(model, padded)  # type: ignore[operator]
    rolled = generate(model, [5, 6, 7], max_new_tokens=40, window=8, sink_tokens=2, compile=True)
    assert torch.equal(rolled, generate(model, [5, 6, 7], max_new_tokens=40, window=8, sink_tokens=2, compile=False))


def test_full_cache_raises_a_clear_error() -> None:
    model = build_model(preset("gpt2-tiny")).eval()
    cache = model.make_cache(1, 4, dtype=torch.float32)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache)
        step = NativeStep.create(model, cache)
        assert step is not None
        step(torch.tensor([[4]]))
        with pytest.raises(ValueError, match="cache holds 4 positions"):
            step(torch.tensor([[5]]))
