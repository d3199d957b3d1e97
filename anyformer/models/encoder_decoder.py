"""Encoder-decoder Transformer with cross-attention (Vaswani et al. 2017; T5).

Legend: `b` batch, `s` source length, `n` target length, `d` width, `V` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.attention import AttentionContext, padding_mask
from ..nn.kv_cache import ModelCache
from ..nn.positional import PositionalEncoding
from .common import Embeddings, GenerativeModel, LMHead, PretrainedIO, Stack, random_tokens, self_attention_context
from .parts import Parts
from .registry import ARCHITECTURES


class EncoderDecoder(GenerativeModel, PretrainedIO, nn.Module):
    """Source tokens -> encoder; target tokens -> causal decoder with cross-attention -> logits.

    Args:
        config: the model config.
        src_embed, tgt_embed: embeddings (the same module when shared).
        enc_positional, dec_positional: positional encodings of each stack.
        encoder, decoder: the stacks; lm_head: unembedding.
    """

    causal = True
    cross_attention = True

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
        return self.encoder(self.src_embed(src, ctx.q_pos, self.enc_positional, graph=attn_mask), ctx)

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """tgt (b, n) and memory (b, s, d) -> logits (b, n, V); keyword arguments as `decode_hidden`."""
        return self.lm_head(self.decode_hidden(tgt, memory, src_mask, **kwargs))

    def decode_hidden(
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
        """tgt (b, n) and memory (b, s, d) -> the decoder's final hidden states (b, n, d)."""
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
        return self.decoder(x, ctx, caches, memory=memory, cross_ctx=cross_ctx, cross_caches=cross_caches)

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): a random source and target, `length` tokens each (default: the context)."""
        return random_tokens(self, batch, generator, length), random_tokens(self, batch, generator, length)

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

    def _decoding_parts(self) -> tuple[nn.Module, PositionalEncoding]:
        return self.decoder, self.dec_positional

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        """Protocol: the encoder's output and the source's key padding, for `decode_step`."""
        if src.shape[1] > self.config.max_seq_len:
            raise ValueError(f"source of {src.shape[1]} tokens is longer than max_seq_len={self.config.max_seq_len}; shorten it")
        return self.encode(src, src_keep), src_keep

    def decode_step(
        self, tokens: Tensor, cache: Any, positions: Tensor, *, attention_mask: Tensor | None = None, source: Any = None,
        last_only: bool = False,
    ) -> Tensor:
        """Protocol: (b, n) decoder tokens through the cache, attending to `source` (from
        `encode_source`) -> logits (b, n, V), or (b, 1, V) of the last position with `last_only`."""
        memory, src_keep = source
        h = self.decode_hidden(tokens, memory, src_keep, cache=cache, positions=positions, attention_mask=attention_mask)
        return self.lm_head(h[:, -1:] if last_only else h)


def standard_parts(cfg: ModelConfig, parts: Parts) -> dict[str, Any]:
    """The parts of an encoder-decoder as keyword arguments of `EncoderDecoder` (and of
    architectures built on it): embeddings (one table when model.share_embeddings), both
    positional encodings, both stacks (the decoder's cross-attending) and the LM head."""
    src = parts.embeddings()
    tgt = src if cfg.share_embeddings else parts.embeddings()
    return dict(
        src_embed=src,
        tgt_embed=tgt,
        enc_positional=parts.positional(causal=False),
        dec_positional=parts.positional(causal=True),
        encoder=parts.stack(cfg.num_layers, causal=False, name="encoder"),
        decoder=parts.stack(cfg.num_decoder_layers or cfg.num_layers, causal=True, cross=True, name="decoder"),
        lm_head=parts.lm_head(tgt),
    )


@ARCHITECTURES.register("encoder_decoder")
def build_encoder_decoder(cfg: ModelConfig, parts: Parts) -> EncoderDecoder:
    """An encoder-decoder (the original Transformer, T5): the decoder's blocks cross-attend."""
    return EncoderDecoder(cfg, **standard_parts(cfg, parts))
