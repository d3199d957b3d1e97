"""Pointer-generator encoder-decoder (See et al. 2017, "Get To The Point"): at each target
position the output distribution mixes the vocabulary softmax with a copy distribution over
the source tokens,

    p(w) = g * p_vocab(w) + (1 - g) * sum_{j : src_j = w} a_j,

where a = softmax over the source positions of (W_q h) . (W_k m_j) / sqrt(d) (padding
excluded), h is the decoder's final hidden state, m the encoder's output and
g = sigmoid(w_g . h + b_g). Copying needs source and target ids in one vocabulary (a shared
tokenizer). The model returns log p as its logits, so the usual cross-entropy, softmax,
sampling and beam search apply unchanged (log_softmax(log p) = log p).

Legend: `b` batch, `s` source length, `n` target length, `d` width, `V` vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from .encoder_decoder import EncoderDecoder, standard_parts
from .parts import Parts
from .registry import ARCHITECTURES


class PointerGenerator(EncoderDecoder):
    """An encoder-decoder whose output may copy source tokens (see the module docstring).

    Args (besides EncoderDecoder's): copy_query, copy_key: the projections of the copy
    attention; gate: the generation gate's linear layer (d -> 1).
    """

    def __init__(self, config: ModelConfig, *, copy_query: nn.Linear, copy_key: nn.Linear, gate: nn.Linear, **parts: Any) -> None:
        super().__init__(config, **parts)
        self.copy_query, self.copy_key, self.gate = copy_query, copy_key, gate

    def mix(self, h: Tensor, memory: Tensor, src: Tensor, src_mask: Tensor | None) -> Tensor:
        """Decoder states h (b, n, d), encoder output memory (b, s, d), source ids src (b, s)
        and its padding mask (b, s) (True = real) -> log p (b, n, V), in fp32."""
        p_vocab = torch.softmax(self.lm_head(h).float(), -1)  # (b, n, V)
        scores = self.copy_query(h).float() @ self.copy_key(memory).float().transpose(1, 2) * h.shape[-1] ** -0.5  # (b, n, s)
        if src_mask is not None:
            scores = scores.masked_fill(~src_mask.bool()[:, None, :], float("-inf"))
        attn = torch.softmax(scores, -1)  # (b, n, s)
        p_copy = torch.zeros_like(p_vocab).scatter_add_(-1, src[:, None, :].expand(-1, h.shape[1], -1), attn)
        g = torch.sigmoid(self.gate(h).float())  # (b, n, 1)
        return torch.log((g * p_vocab + (1 - g) * p_copy).clamp_min(torch.finfo(torch.float32).tiny))

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None, *,
                attn_store: list | None = None) -> Tensor:
        """Teacher-forced log-probabilities (b, n, V) of target `tgt` given source `src`."""
        memory = self.encode(src, src_mask, attn_store=attn_store)
        h = self.decode_hidden(tgt, memory, src_mask, attention_mask=tgt_mask, attn_store=attn_store)
        return self.mix(h, memory, src, src_mask)

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        """Protocol: the encoder's output, the source's key padding and the source ids."""
        memory, keep = super().encode_source(src, src_keep)
        return memory, keep, src

    def decode_step(self, tokens: Tensor, cache: Any, positions: Tensor, *, attention_mask: Tensor | None = None, source: Any = None,
                    last_only: bool = False) -> Tensor:
        """Protocol: (b, n) decoder tokens through the cache -> log p (b, n, V), or (b, 1, V)
        of the last position with `last_only`."""
        memory, src_keep, src = source
        h = self.decode_hidden(tokens, memory, src_keep, cache=cache, positions=positions, attention_mask=attention_mask)
        return self.mix(h[:, -1:] if last_only else h, memory, src, src_keep)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per target token (model summary): the encoder-decoder's count (Kaplan et
        al.) plus the copy attention's projections, scores and gate."""
        from .summary import flops_per_token

        count = sum(p.numel() for p in self.parameters()) - self.src_embed.tokens.weight.numel()
        if self.tgt_embed is not self.src_embed:
            count -= self.tgt_embed.tokens.weight.numel()
        encdec = dataclasses.replace(self.config, arch="encoder_decoder")
        return flops_per_token(encdec, count, seq_len) + 2 * 2 * seq_len * self.config.dim


@ARCHITECTURES.register("pointer_generator")
def build_pointer_generator(cfg: ModelConfig, parts: Parts) -> PointerGenerator:
    """An encoder-decoder with a copy distribution over the source (shared vocabulary)."""
    if not cfg.share_embeddings:
        raise ConfigError("model.arch 'pointer_generator' copies source ids into the target vocabulary: set model.share_embeddings=true "
                          "(and a shared tokenizer, e.g. task.options.shared_vocab=true)")
    return PointerGenerator(
        cfg,
        **standard_parts(cfg, parts),
        copy_query=nn.Linear(cfg.dim, cfg.dim, bias=False),
        copy_key=nn.Linear(cfg.dim, cfg.dim, bias=False),
        gate=nn.Linear(cfg.dim, 1),
    )
