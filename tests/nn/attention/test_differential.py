"""Differential attention (Ye et al. 2024) against Hugging Face's DiffLlama, the paper's
formula written naively, and its depth schedule."""

from __future__ import annotations

import math
import re

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.generation import generate

import transformers

V, D, L, H, G, F = 96, 64, 3, 4, 2, 96


def our_config(**attention: object) -> ModelConfig:
    return ModelConfig(
        arch="decoder", vocab_size=V, dim=D, num_layers=L, max_seq_len=64,
        attention={"kind": "differential", "num_heads": H, "num_kv_heads": G, "options": {"norm_eps": 1e-5}, **attention},
        positional={"kind": "rope", "options": {"base": 10000.0}}, norm={"kind": "rmsnorm", "eps": 1e-5},
        ffn={"kind": "swiglu", "hidden_dim": F}, tie_embeddings=False,
    )


def hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffLlama's state dict under our names (the converter of this test)."""
    out = {}
    for name, t in sd.items():
        if "rotary_emb" in name:
            continue
        new = name.replace("model.embed_tokens.", "embed.tokens.").replace("model.norm.", "stack.final_norm.")
        new = new.replace("lm_head.", "lm_head.proj.")
        m = re.match(r"model\.layers\.(\d+)\.(.*)", new)
        if m:
            i, rest = m.groups()
            rest = re.sub(r"^self_attn\.", "attn.sublayer.", rest)
            rest = re.sub(r"^mlp\.(gate|up|down)_proj\.", r"ffn.sublayer.\1.", rest)
            rest = rest.replace("input_layernorm.", "attn.norm.").replace("post_attention_layernorm.", "ffn.norm.")
            new = f"stack.blocks.{i}.{rest}"
        out[new] = t
    return out


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = transformers.DiffLlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=G,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.DiffLlamaForCausalLM(hf_cfg).eval()
    ours = build_model(our_config()).eval()
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    return hf, ours


def test_logits_equal_hf_diffllama(pair) -> None:
    hf, ours = pair
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
    assert (out - ref).abs().max().item() <= 1e-5


def test_cached_greedy_decoding_equals_hf_generate(pair) -> None:
    hf, ours = pair
    prompt = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for compile in (False, True):
        assert torch.equal(generate(ours, prompt, max_new_tokens=15, compile=compile), ref)


def test_lambda_init_follows_the_depth_schedule() -> None:
    model = build_model(our_config())
    for i, block in enumerate(model.stack.blocks):
        assert block.attn.sublayer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * i), abs=1e-12)
    fixed = build_model(our_config(options={"lambda_init": 0.5}))
    assert all(b.attn.sublayer.lambda_init == 0.5 for b in fixed.stack.blocks)


def naive_differential(attn, x: torch.Tensor, layer_lambda_init: float) -> torch.Tensor:
    """The paper's formula with h/2 heads, each with two query/key maps of width d and values
    of width 2d (no cache, no positions, causal)."""
    b, n, _ = x.shape
    h, g, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, n, h, d)
    k = attn.k_proj(x).view(b, n, g, d)
    v = attn.v_proj(x).view(b, n, g, d)
    lam = (torch.exp((attn.lambda_q1 * attn.lambda_k1).sum()) - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum()) + layer_lambda_init)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    heads = []
    for i in range(h // 2):
        kv1 = i // (h // g)  # key/value head of query head i
        kv2 = kv1 + g // 2  # ... and of query head i + h/2
        def softmax(qh, kh):
            s = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
            return s.masked_fill(~causal, float("-inf")).softmax(-1)
        a = softmax(q[:, :, i], k[:, :, kv1]) - lam * softmax(q[:, :, i + h // 2], k[:, :, kv2])  # (b, n, n)
        val = torch.cat([v[:, :, kv1], v[:, :, kv1 + g // 2]], -1)  # (b, n, 2d)
        o = a @ val
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
        heads.append((1 - layer_lambda_init) * o)
    return attn.o_proj(torch.cat(heads, -1))


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "chunked"])
def test_layer_equals_the_naive_formula(kernel: str) -> None:
    torch.manual_seed(3)
    cfg = our_config(kernel=kernel, num_heads=8, num_kv_heads=4)
    cfg.positional.kind, cfg.positional.options = "none", {}
    model = build_model(cfg).eval()
    attn = model.stack.blocks[2].attn.sublayer
    x = torch.randn(2, 11, D)
    from anyformer.nn.attention import AttentionContext

    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        ours = attn(x, AttentionContext(q_pos=pos, k_pos=pos, causal=True))
        ref = naive_differential(attn, x, attn.lambda_init)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_attention_store_holds_the_differential_maps(pair) -> None:
    _, ours = pair
    store: list[torch.Tensor] = []
    with torch.no_grad():
        ours(torch.randint(0, V, (1, 6)), attn_store=store)
    assert len(store) == L and store[0].shape == (1, H // 2, 6, 6)
    # rows of a difference of two stochastic matrices sum to 1 - lambda
    lam = ours.stack.blocks[0].attn.sublayer.lam().detach()
    torch.testing.assert_close(store[0].sum(-1), torch.full((1, H // 2, 6), float(1 - lam)), atol=1e-5, rtol=0)


def test_odd_head_counts_are_refused() -> None:
    from anyformer.config import ConfigError

    with pytest.raises(ConfigError, match="must both be even"):
        build_model(our_config(num_heads=4, num_kv_heads=1))


def test_the_default_norm_eps_is_diffllamas() -> None:
    """The per-head norm's epsilon is too small to move the parity tests' outputs; its default is
    pinned to the reference's own (DiffLlama normalizes each head with the model's rms_norm_eps)."""
    from anyformer.nn.attention.differential import DifferentialOptions

    assert DifferentialOptions().norm_eps == transformers.DiffLlamaConfig().rms_norm_eps == 1e-5
