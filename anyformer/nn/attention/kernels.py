"""Exact attention kernels behind one signature:

    kernel(q, k, v, *, mask, bias, causal, scale, dropout) -> out

Legend: `b` batch, `h` query heads, `g` key/value heads (h % g == 0), `n` queries, `m` keys,
`d` head dim. q: (b, h, n, d); k, v: (b, g, m, d); mask: bool broadcastable to (b, h, n, m),
True = attend; bias: float broadcastable to (b, h, n, m), added to the logits; causal: query i
sees keys j <= i + (m - n) (the queries are the last n positions). A query row with no key to
attend returns zeros.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .masks import causal_mask, combine_masks
from .native_kernels import native_softmax
from .registry import KERNELS


class Kernel(Protocol):
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> Tensor: ...


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(b, g, m, d) -> (b, g * groups, m, d), each key/value head serving `groups` query heads."""
    if groups == 1:
        return x
    b, g, m, d = x.shape
    return x[:, :, None].expand(b, g, groups, m, d).reshape(b, g * groups, m, d)


def full_mask(mask: Tensor | None, causal: bool, n: int, m: int, device: torch.device) -> Tensor | None:
    """The boolean mask with the causal constraint folded in (None when nothing is masked)."""
    return combine_masks(mask, causal_mask(n, m, device) if causal else None)


def attention_logits(
    q: Tensor,
    k: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Scaled attention logits (b, h, n, m) in at least fp32, plus the bias, with -inf where the
    mask (and causality) forbids a key."""
    h, n, d = q.shape[1], q.shape[2], q.shape[3]
    k = repeat_kv(k, h // k.shape[1])
    m = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32 for the softmax
    logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (b, h, n, m)
    if bias is not None:
        logits = logits + bias.to(acc)
    allowed = full_mask(mask, causal, n, m, q.device)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def masked_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim; a row whose logits are all -inf (no visible key) gives zeros."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention probabilities (b, h, n, m), computed in fp32; fully masked rows are 0."""
    return masked_softmax(attention_logits(q, k, mask=mask, bias=bias, causal=causal, scale=scale))


@KERNELS.register("eager")
def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Reference attention: softmax(q k^T * scale + bias, masked) v, written out in full."""
    probs = attention_weights(q, k, mask=mask, bias=bias, causal=causal, scale=scale)
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    return torch.matmul(probs.to(v.dtype), v)


def _native_decode(q: Tensor, k: Tensor, v: Tensor):  # type: ignore[no-untyped-def]
    """The C++ one-query kernel (cpu_softmax.cpp) where it applies: no gradients, unit stride
    along the head dim; else None."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    return native_softmax(q.device, q.dtype)


@KERNELS.register("sdpa")
def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """PyTorch's fused scaled_dot_product_attention, with masks and bias merged for it."""
    n, m = q.shape[2], k.shape[2]
    if n == 1 and q.device.type == "cpu":
        # one query (cached decoding): in fp32 with nothing masked, the fused kernel is fastest;
        # in bf16 or with a mask/bias (it would get a materialised mask), the plain matmuls are
        if q.dtype == torch.float32 and mask is None and bias is None and dropout == 0.0:
            native = _native_decode(q, k, v)
            if native is not None:  # one C++ call: no thread start-up, no copies for grouped heads
                # the registered operator when torch.compile traces; the direct binding (cheaper per call) eagerly
                call = torch.ops.anyformer.decode_attention if torch.compiler.is_compiling() else native.decode_attention
                return call(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
            groups = q.shape[1] // k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), scale=scale)
        return eager_attention(q, k, v, mask=mask, bias=bias, causal=False, scale=scale, dropout=dropout)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None and bias is None and (not causal or n == m):
        return sdpa(q, k, v, is_causal=causal, scale=scale, dropout_p=dropout)
    allowed = full_mask(mask, causal, n, m, q.device)
    if bias is None:
        attn_mask = allowed
    else:
        attn_mask = bias.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    out = sdpa(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout)
    if allowed is not None:
        # a row with no visible key has no defined softmax: return zeros, as the eager kernel does
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0).nan_to_num(0.0)
    return out
