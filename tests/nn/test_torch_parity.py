"""Parity with torch.nn: MultiheadAttention and post-norm Transformer encoder/decoder layers.

Weights are random; torch's modules are the reference. Masks follow torch's convention
(True = blocked) on the torch side and ours (True = attend) on our side.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anyformer.convert import ConversionError
from anyformer.convert.torch_nn import block_from_torch, config_from_torch_layer, copy_multihead_attention
from anyformer.nn.attention import AttentionContext, MultiHeadAttention, as_4d, combine_masks, padding_mask

TOL = 1e-5
B, N, M, D, H = 2, 5, 7, 16, 4


def _ctx(n: int, m: int, *, key_pad: torch.Tensor | None = None, causal: bool = False, attn_mask: torch.Tensor | None = None) -> AttentionContext:
    """Our context from torch-convention masks: key_pad (b, m) True = padding; attn_mask (n, m) True = blocked."""
    pad = None if key_pad is None else padding_mask(~key_pad)
    user = None if attn_mask is None else as_4d(~attn_mask, B, H, n, m)
    q_pos = torch.arange(n).expand(B, n)
    k_pos = torch.arange(m).expand(B, m)
    return AttentionContext(q_pos=q_pos, k_pos=k_pos, mask=combine_masks(pad, user), causal=causal)


def _key_pad(m: int) -> torch.Tensor:
    pad = torch.zeros(B, m, dtype=torch.bool)
    pad[1, m - 2 :] = True  # the second sequence ends two tokens early
    return pad


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches_torch(bias: bool) -> None:
    ref = nn.MultiheadAttention(D, H, bias=bias, batch_first=True).eval()
    ours = MultiHeadAttention.standard(D, H, bias=bias).eval()
    copy_multihead_attention(ref, ours)
    x = torch.randn(B, N, D)
    pad = _key_pad(N)
    with torch.no_grad():
        want, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
        got = ours(x, _ctx(N, N, key_pad=pad))
    assert (got - want).abs().max().item() <= TOL


def test_cross_attention_with_kdim_matches_torch() -> None:
    kv_dim = 12
    ref = nn.MultiheadAttention(D, H, kdim=kv_dim, vdim=kv_dim, batch_first=True).eval()
    ours = MultiHeadAttention.standard(D, H, kv_dim=kv_dim, bias=True).eval()
    copy_multihead_attention(ref, ours)
    x, mem = torch.randn(B, N, D), torch.randn(B, M, kv_dim)
    pad = _key_pad(M)
    with torch.no_grad():
        want, _ = ref(x, mem, mem, key_padding_mask=pad, need_weights=False)
        got = ours(x, _ctx(N, M, key_pad=pad), memory=mem)
    assert (got - want).abs().max().item() <= TOL


def test_unsupported_attention_options_raise() -> None:
    with pytest.raises(ConversionError, match="add_bias_kv"):
        copy_multihead_attention(nn.MultiheadAttention(D, H, add_bias_kv=True), MultiHeadAttention.standard(D, H, bias=True))
    with pytest.raises(ConversionError, match="head counts"):
        copy_multihead_attention(nn.MultiheadAttention(D, H), MultiHeadAttention.standard(D, 2, bias=True))


@pytest.mark.parametrize("activation,norm_first", [("relu", False), ("gelu", False), ("relu", True)])
def test_encoder_layer_matches_torch(activation: str, norm_first: bool) -> None:
    ref = nn.TransformerEncoderLayer(
        D, H, dim_feedforward=24, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    block = block_from_torch(ref)
    x = torch.randn(B, N, D)
    pad = _key_pad(N)
    blocked = torch.rand(N, N) < 0.3
    blocked.fill_diagonal_(False)  # every query keeps at least itself
    with torch.no_grad():
        want = ref(x, src_mask=blocked, src_key_padding_mask=pad)
        got = block(x, _ctx(N, N, key_pad=pad, attn_mask=blocked))
    assert (got - want).abs().max().item() <= TOL


def test_decoder_layer_matches_torch() -> None:
    ref = nn.TransformerDecoderLayer(D, H, dim_feedforward=24, dropout=0.0, batch_first=True).eval()
    block = block_from_torch(ref)
    x, mem = torch.randn(B, N, D), torch.randn(B, M, D)
    mem_pad = _key_pad(M)
    causal = nn.Transformer.generate_square_subsequent_mask(N) != 0  # True above the diagonal
    with torch.no_grad():
        want = ref(x, mem, tgt_mask=causal, memory_key_padding_mask=mem_pad)
        got = block(x, _ctx(N, N, causal=True), memory=mem, cross_ctx=_ctx(N, M, key_pad=mem_pad))
    assert (got - want).abs().max().item() <= TOL


def test_config_from_torch_layer_reads_structure() -> None:
    layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=24, norm_first=True, layer_norm_eps=1e-6, bias=False)
    cfg = config_from_torch_layer(layer)
    assert (cfg.dim, cfg.attention.num_heads, cfg.ffn.hidden_dim) == (D, H, 24)
    assert (cfg.norm.placement, cfg.norm.eps, cfg.norm.bias, cfg.attention.bias, cfg.ffn.bias) == ("pre", 1e-6, False, False, False)
