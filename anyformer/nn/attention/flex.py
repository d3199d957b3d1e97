"""Attention on CUDA: SDPA's fused kernels for plain exact attention, FlexAttention for sparsity
patterns, positional biases (ALiBi, T5) and masks.

The chunked kernel (and every sparse kind built on it) calls `cuda_attention` for CUDA tensors;
on the CPU it keeps its own loops, because FlexAttention has no CPU backward. FlexAttention
gets the pattern as a block mask (blocks the pattern leaves empty are skipped, as in the
chunked kernel) and the biases as a score modifier:

    mask_mod(b, h, i, j)  = pattern(i + m - n, j) and (j <= i + m - n if causal) and mask[b, h, i, j]
    score_mod(s, b, h, i, j) = s + positional bias(i, j) + bias[b, h, i, j]

A positional bias that depends on the distance only (`relative_bias`: ALiBi, T5), with
consecutive positions, is read from a table over the n + m - 1 distances instead of a whole
(b, h, n, m) tensor. `flex_attention` itself also runs forward on the CPU (slowly, unfused),
which is how the tests check this path against the reference kernel on machines without a GPU.

Legend: `b` batch, `h` query heads, `g` key/value heads, `n` queries, `m` keys, `d` head dim.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .patterns import Pattern

_compiled: dict[str, Callable[..., Tensor]] = {}


def flex_available() -> bool:
    """Whether this PyTorch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex(device: torch.device) -> Callable[..., Tensor]:
    """flex_attention, compiled on CUDA (its fused Triton kernel); as it is elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["cuda"]


def _pick(t: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """t (broadcastable to (b, h, n, m)) at [b, h, i, j]: broadcast dims read index 0."""
    zero = torch.zeros_like(i)
    idx = [x if size > 1 else zero for x, size in zip((b, h, i, j), t.shape[-4:])]
    return t[idx[0], idx[1], idx[2], idx[3]]


def _as4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _relative_table(block_bias: Any, n: int, m: int) -> Tensor | None:
    """The positional bias as a (h, n + m - 1) table over distances j - (i + m - n), when it
    depends on the distance only and the positions are consecutive with the same offset in
    every row; else None."""
    positional, q_pos, k_pos = block_bias.positional, block_bias.q_pos, block_bias.k_pos
    if not getattr(positional, "relative_bias", False):
        return None
    steps_q = torch.arange(n, device=q_pos.device)
    steps_k = torch.arange(m, device=k_pos.device)
    if not (torch.equal(q_pos - q_pos[:, :1], steps_q.expand_as(q_pos)) and torch.equal(k_pos - k_pos[:, :1], steps_k.expand_as(k_pos))):
        return None
    if not torch.equal(q_pos[:, 0] - k_pos[:, 0], torch.full_like(q_pos[:, 0], m - n)):
        return None  # queries are not the last n of the keys in some row
    # one query at position m - 1 against keys 0 .. m + n - 2 covers distances -(m-1) .. n-1
    last = torch.tensor([[m - 1]], device=q_pos.device)
    keys = torch.arange(m + n - 1, device=k_pos.device)[None]
    return positional.bias(last, keys)[0, :, 0]  # (h, n + m - 1)


def flex_attention_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_bias: Any = None,
    block_size: int = 128,
) -> Tensor:
    """Exact attention through FlexAttention: q (b, h, n, d), k/v (b, g, m, d) -> (b, h, n, d),
    under the pattern (queries are the last n of the m keys), causality, a bool `mask` and
    float `bias` broadcastable to (b, h, n, m), and a positional `block_bias` (a
    PositionalBlockBias). A query with no visible key gives zeros. No dropout."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, n, _ = q.shape
    m = k.shape[2]
    offset = m - n
    user_mask = None if mask is None else _as4d(mask)
    masks: list[Callable[..., Tensor]] = []
    if pattern is not None and pattern.elementwise:
        masks.append(lambda bi, hi, i, j: pattern.mask((i + offset).reshape(1), j.reshape(1))[0, 0])
    elif pattern is not None:  # a pattern FlexAttention cannot evaluate pair by pair: its (n, m) mask
        dense = pattern.dense(n, m, q.device)
        masks.append(lambda bi, hi, i, j: dense[i, j])
    if causal:
        masks.append(lambda bi, hi, i, j: j <= i + offset)
    if user_mask is not None:
        masks.append(lambda bi, hi, i, j: _pick(user_mask, bi, hi, i, j))
    block_mask = None
    if masks:
        def mask_mod(bi: Tensor, hi: Tensor, i: Tensor, j: Tensor) -> Tensor:
            out = masks[0](bi, hi, i, j)
            for extra in masks[1:]:
                out = out & extra(bi, hi, i, j)
            return out

        batched = user_mask is not None
        block_mask = create_block_mask(
            mask_mod, b if batched and user_mask.shape[0] > 1 else None, h if batched and user_mask.shape[1] > 1 else None,
            n, m, device=q.device, BLOCK_SIZE=block_size,
        )
    biases: list[Callable[..., Tensor]] = []
    if bias is not None:
        dense_bias = _as4d(bias)
        biases.append(lambda bi, hi, i, j: _pick(dense_bias, bi, hi, i, j))
    if block_bias is not None:
        table = _relative_table(block_bias, n, m)
        if table is not None:
            biases.append(lambda bi, hi, i, j: table[hi, j - i - offset + (m - 1)])
        else:
            full = block_bias(0, n, 0, m)  # (b or 1, h, n, m)
            if full is not None:
                full4 = _as4d(full)
                biases.append(lambda bi, hi, i, j: _pick(full4, bi, hi, i, j))
    score_mod = None
    if biases:
        def score_mod(score: Tensor, bi: Tensor, hi: Tensor, i: Tensor, j: Tensor) -> Tensor:
            for add in biases:
                score = score + add(bi, hi, i, j).to(score.dtype)
            return score

    groups = h // k.shape[1]
    out = _flex(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)
    return out  # type: ignore[no-any-return]


def cuda_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    pattern: Pattern | None,
    mask: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    scale: float | None,
    dropout: float,
    block_bias: Any,
) -> Tensor | None:
    """The CUDA path of the chunked kernel: SDPA (flash or memory-efficient kernel) when there
    is no pattern, mask or bias; FlexAttention otherwise. None where neither applies (dropout
    with a pattern or bias: FlexAttention has none; a query-aware positional term), so the
    caller computes it itself."""
    n, m = q.shape[2], k.shape[2]
    if pattern is None and mask is None and bias is None and block_bias is None and (not causal or n == m):
        groups = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, dropout_p=dropout, enable_gqa=groups > 1
        )
    if dropout > 0.0 or not flex_available() or getattr(block_bias, "query_aware", False) or getattr(block_bias, "value_aware", False):
        return None  # a term computed from the queries or probabilities goes through the chunked loops' per-block autograd
    return flex_attention_call(q, k, v, pattern=pattern, mask=mask, bias=bias, causal=causal, scale=scale, block_bias=block_bias)
