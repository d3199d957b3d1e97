"""Decoder-only language model (GPT, Llama).

Legend: `b` batch, `n` length, `d` width, `V` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.kv_cache import ModelCache
from ..nn.positional import PositionalEncoding
from .common import Embeddings, GenerativeModel, LMHead, PretrainedIO, Stack, random_tokens, self_attention_context
from .parts import Parts
from .registry import ARCHITECTURES


class DecoderLM(GenerativeModel, PretrainedIO, nn.Module):
    """Causal language model: embeddings -> causal blocks -> final norm -> LM head.

    Args:
        config: the model's config (kept for summaries, caches and saving).
        embed: token embeddings; positional: the shared positional encoding;
        stack: the blocks; lm_head: unembedding (tied or not).
    """

    causal = True

    def __init__(
        self, config: ModelConfig, embed: Embeddings, positional: PositionalEncoding, stack: Stack, lm_head: LMHead
    ) -> None:
        super().__init__()
        self.config = config
        self.embed, self.positional, self.stack, self.lm_head = embed, positional, stack, lm_head

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random tokens, `length` of them (default: the context)."""
        return (random_tokens(self, batch, generator, length),)

    def forward(
        self,
        tokens: Tensor,
        cache: ModelCache | None = None,
        positions: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_store: list | None = None,
    ) -> Tensor:
        """tokens (b, n) -> logits (b, n, V).

        cache: a ModelCache from `make_cache`, extended in place; positions: (b, n) ids
        (default: continuing after the cache); attention_mask: (b, n) 1 for real tokens;
        attn_mask: bool or additive mask broadcastable to (b, h, n, m); attn_store: a list that
        receives each layer's (b, h, n, m) attention weights.
        """
        return self.lm_head(
            self.hidden(tokens, cache, positions, attention_mask=attention_mask, attn_mask=attn_mask, attn_store=attn_store)
        )

    def hidden(
        self,
        tokens: Tensor,
        cache: ModelCache | None = None,
        positions: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_store: list | None = None,
    ) -> Tensor:
        """tokens (b, n) -> final hidden states (b, n, d)."""
        ctx = self_attention_context(
            tokens,
            self.positional,
            causal=True,
            num_heads=self.config.attention.num_heads,
            positions=positions,
            attention_mask=attention_mask,
            attn_mask=attn_mask,
            cache=cache,
            store=attn_store,
        )
        x = self.embed(tokens, ctx.q_pos, self.positional, graph=attn_mask)
        return self.stack(x, ctx, None if cache is None else list(cache.layers))

    def decode_step(
        self, tokens: Tensor, cache: Any, positions: Tensor, *, attention_mask: Tensor | None = None, source: Any = None,
        last_only: bool = False,
    ) -> Tensor:
        """Protocol (anyformer.protocol): (b, n) tokens through the cache -> logits (b, n, V), or
        (b, 1, V) of the last position with `last_only` (the head runs on that position only)."""
        h = self.hidden(tokens, cache, positions, attention_mask=attention_mask)
        return self.lm_head(h[:, -1:] if last_only else h)


@ARCHITECTURES.register("decoder")
def build_decoder(cfg: ModelConfig, parts: Parts) -> DecoderLM:
    """A decoder-only causal language model."""
    embed = parts.embeddings()
    return DecoderLM(cfg, embed, parts.positional(causal=True), parts.stack(cfg.num_layers, causal=True), parts.lm_head(embed))
