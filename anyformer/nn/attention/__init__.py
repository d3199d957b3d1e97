"""Attention: exact kernels, masks, multi-head attention and the registry of attention kinds.

An attention kind is a factory `(AttentionConfig, *, dim, causal, cross) -> nn.Module` whose
module is called as `module(x, ctx, memory=None, cache=None)`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ...config import AttentionConfig
from ...registry import Registry
from ..norm import NORMS
from .context import AttentionContext
from .kernels import KERNELS, Kernel, attention_weights, eager_attention, sdpa_attention
from .masks import as_4d, causal_mask, combine_masks, padding_mask
from .mha import MultiHeadAttention

AttentionFactory = Callable[..., nn.Module]
ATTENTIONS: Registry[AttentionFactory] = Registry("attention kind")


@ATTENTIONS.register("mha")
def build_mha(
    cfg: AttentionConfig, *, dim: int, causal: bool, cross: bool = False, kv_dim: int | None = None, kernel: Kernel | None = None
) -> nn.Module:
    """Standard multi-head (GQA/MQA) attention with one of the exact kernels (`kernel`
    overrides `cfg.kernel`, e.g. a kernel bound to a sparsity pattern)."""
    if cfg.options and kernel is None:
        raise ValueError(
            f"attention kind 'mha' takes no options, got {sorted(cfg.options)}; "
            "set them on model.attention directly"
        )
    head_dim = cfg.head_dim or dim // cfg.num_heads
    q_norm = k_norm = None
    if cfg.qk_norm != "none":
        q_norm = NORMS.get(cfg.qk_norm)(head_dim)
        k_norm = NORMS.get(cfg.qk_norm)(head_dim)
    return MultiHeadAttention(
        dim,
        cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=head_dim,
        kernel=kernel or KERNELS.get(cfg.kernel),
        kv_dim=kv_dim,
        bias=cfg.bias,
        out_bias=cfg.out_bias,
        q_norm=q_norm,
        k_norm=k_norm,
        scale=cfg.scale,
        dropout=cfg.dropout,
    )


from . import chunked, hyper, linear, performer, sparse  # noqa: E402,F401  (register kernels and kinds)

__all__ = [
    "ATTENTIONS",
    "KERNELS",
    "AttentionContext",
    "MultiHeadAttention",
    "attention_weights",
    "eager_attention",
    "sdpa_attention",
    "as_4d",
    "causal_mask",
    "combine_masks",
    "padding_mask",
]
