"""The sequential block: self-attention, then (cross-attention, then) feed-forward, each in its
residual placement (Vaswani et al. 2017; GPT-2; Llama)."""

from __future__ import annotations

from torch import nn

from ...nn.block import CrossAttentionBlock, TransformerBlock
from ...nn.build_context import BuildContext
from ..parts import Parts
from ..registry import BLOCKS


@BLOCKS.register("sequential")
def build_sequential(parts: Parts, ctx: BuildContext) -> nn.Module:
    """x -> attention -> (cross-attention) -> feed-forward, each wrapped by the norm placement."""
    if parts.cfg.block.options:
        raise ValueError(f"block kind 'sequential' takes no options, got {sorted(parts.cfg.block.options)}")
    attn = parts.wrap(parts.attention(ctx))
    ffn = parts.wrap(parts.feedforward(ctx, stateful=not ctx.cross))
    if ctx.cross:
        return CrossAttentionBlock(attn, parts.wrap(parts.cross_attention(ctx)), ffn)
    return TransformerBlock(attn, ffn)
