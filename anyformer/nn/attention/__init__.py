"""Attention: exact kernels, masks, multi-head attention and the registry of attention kinds.

An attention kind is a factory `(AttentionConfig, BuildContext) -> nn.Module` registered in
`ATTENTIONS` (registry.py); its module is called as `module(x, ctx, memory=None, cache=None)`.
Every module of this package is imported here, so a new variant file registers itself.
"""

from __future__ import annotations

from ...registry import discover
from .context import AttentionContext
from .kernels import Kernel, attention_weights, eager_attention, sdpa_attention
from .masks import as_4d, causal_mask, combine_masks, padding_mask
from .mha import MultiHeadAttention, build_mha, mha_from_config
from .registry import ATTENTIONS, KERNELS

discover(__name__, __path__)

__all__ = [
    "ATTENTIONS",
    "KERNELS",
    "AttentionContext",
    "Kernel",
    "MultiHeadAttention",
    "attention_weights",
    "build_mha",
    "eager_attention",
    "mha_from_config",
    "sdpa_attention",
    "as_4d",
    "causal_mask",
    "combine_masks",
    "padding_mask",
]
