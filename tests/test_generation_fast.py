"""Compiled one-row linear layers for decoding (GenerationConfig.compile): the GEMV matches
torch's linear, other calls pass through untouched, and greedy tokens equal Hugging Face's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anyformer.generation import generate
from anyformer.generation.fast import GemvMode, gemv


@pytest.mark.parametrize("bias", [True, False])
def test_gemv_matches_linear(bias: bool) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(37, 19), torch.randn(19)
    b = torch.randn(37) if bias else None
    torch.testing.assert_close(gemv(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_gemv_bf16_accumulates_in_fp32() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(64, 4096).bfloat16(), torch.randn(4096).bfloat16()
    exact = (w.double() * x.double()).sum(-1)
    got = gemv(x, w, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)


def test_mode_passes_multi_row_and_grad_calls_through() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    rows = torch.randn(3, 8)
    with GemvMode() as mode:
        out = lin(rows)
        one = lin(torch.randn(1, 8, requires_grad=True))  # weight needs grad: plain linear keeps autograd
    assert torch.equal(out, F.linear(rows, lin.weight, lin.bias))
    assert one.requires_grad and not mode.failed


def test_compiled_decoding_matches_hf_greedy() -> None:
    transformers = pytest.importorskip("transformers")
    from anyformer.convert.hf import model_from_hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.3,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = model_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                           min_new_tokens=12, pad_token_id=1)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, compile=True), want)
