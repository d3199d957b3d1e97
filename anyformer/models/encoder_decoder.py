"""Encoder-decoder Transformer with cross-attention (Vaswani et al. 2017; T5).

Legend: `b` batch, `s` source length, `n` target length, `d` width, `V` vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.attention import AttentionContext, padding_mask
from ..nn.kv_cache import CrossKVCache, ModelCache, make_layer_cache
from ..nn.positional import PositionalEncoding
from .common import PretrainedIO, Embeddings, LMHead, Stack, self_attention_context


class EncoderDecoder(PretrainedIO, nn.Module):
    """Source tokens -> encoder; target tokens -> causal decoder with cross-attention -> logits.

    Args:
        config: the model config.
        src_embed, tgt_embed: embeddings (the same module when shared).
        enc_positional, dec_positional: positional encodings of each stack.
        encoder, decoder: the stacks; lm_head: unembedding.
    """

    causal = True

    def __init__(
        self,
        config: ModelConfig,
        *,
        src_embed: Embeddings,
        tgt_embed: Embeddings,
        enc_positional: PositionalEncoding,
        dec_positional: PositionalEncoding,
        encoder: Stack,
        decoder: Stack,
        lm_head: LMHead,
    ) -> None:
        super().__init__()
        self.config = config
        self.src_embed, self.tgt_embed = src_embed, tgt_embed
        self.enc_positional, self.dec_positional = enc_positional, dec_positional
        self.encoder, self.decoder, self.lm_head = encoder, decoder, lm_head

    def encode(
        self, src: Tensor, src_mask: Tensor | None = None, *, attn_mask: Tensor | None = None, attn_store: list | None = None
    ) -> Tensor:
        """src (b, s) -> memory (b, s, d); src_mask (b, s) is 1 for real tokens."""
        ctx = self_attention_context(
            src,
            self.enc_positional,
            causal=False,
            num_heads=self.config.attention.num_heads,
            attention_mask=src_mask,
            attn_mask=attn_mask,
            store=attn_store,
        )
        return self.encoder(self.src_embed(src, ctx.q_pos, self.enc_positional), ctx)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_mask: Tensor | None = None,
        *,
        cache: ModelCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        attn_store: list | None = None,
    ) -> Tensor:
        """tgt (b, n) and memory (b, s, d) -> logits (b, n, V)."""
        ctx = self_attention_context(
            tgt,
            self.dec_positional,
            causal=True,
            num_heads=self.config.attention.num_heads,
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            store=attn_store,
        )
        b, s = memory.shape[:2]
        src_pos = torch.arange(s, device=memory.device).expand(b, s)
        cross_ctx = AttentionContext(
            q_pos=ctx.q_pos,
            k_pos=src_pos,
            mask=None if src_mask is None else padding_mask(src_mask),
            causal=False,
            store=attn_store,
        )
        x = self.tgt_embed(tgt, ctx.q_pos, self.dec_positional)
        caches = None if cache is None else list(cache.layers)
        cross_caches = None if cache is None else list(cache.cross)
        h = self.decoder(x, ctx, caches, memory=memory, cross_ctx=cross_ctx, cross_caches=cross_caches)
        return self.lm_head(h)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        *,
        attn_store: list | None = None,
    ) -> Tensor:
        """Teacher-forced logits (b, n, V) of target `tgt` given source `src`."""
        memory = self.encode(src, src_mask, attn_store=attn_store)
        return self.decode(tgt, memory, src_mask, attention_mask=tgt_mask, attn_store=attn_store)

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> ModelCache:  # type: ignore[no-untyped-def]
        """A decoder cache (self-attention keys/values plus cross-attention memory keys/values)."""
        cfg = self.config
        p = next(self.parameters())
        n = len(self.decoder.blocks)
        layers = [
            make_layer_cache(
                block.attn.sublayer, batch, max_len or cfg.max_seq_len, cfg.num_kv_heads, cfg.head_dim,
                dtype=dtype or p.dtype, device=device or p.device,
            )
            for block in self.decoder.blocks
        ]
        return ModelCache(layers, [CrossKVCache() for _ in range(n)])
