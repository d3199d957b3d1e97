"""Encoder-only model (BERT) and its output heads.

Legend: `b` batch, `n` length, `d` width, `V` vocabulary, `c` labels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.positional import PositionalEncoding
from .common import Embeddings, PretrainedIO, Stack, random_tokens, self_attention_context
from .parts import Parts
from .registry import ARCHITECTURES, HEADS


def pool(hidden: Tensor, attention_mask: Tensor | None, kind: str) -> Tensor:
    """(b, n, d) -> (b, d): the first ([CLS]) token, or the mean over real tokens."""
    if kind == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    w = attention_mask.to(hidden.dtype)[..., None]  # (b, n, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


class NoHead(nn.Module):
    """Returns the final hidden states (b, n, d)."""

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return hidden


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> norm -> tied unembedding + bias; (b, n, V)."""

    def __init__(self, dim: int, vocab_size: int, *, norm: nn.Module, tied: nn.Embedding | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = norm
        self.decoder = nn.Linear(dim, vocab_size)
        if tied is not None:
            self.decoder.weight = tied.weight

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.decoder(self.norm(nn.functional.gelu(self.dense(hidden))))


class Pooler(nn.Module):
    """Pool to one vector per sequence, optionally through BERT's dense + tanh pooler."""

    def __init__(self, dim: int, *, pooling: str, dense: bool) -> None:
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) if dense else nn.Identity()

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:  # (b, n, d) -> (b, d)
        return self.dense(pool(hidden, attention_mask, self.pooling))


class SequenceClassificationHead(nn.Module):
    """Pooled vector -> dropout -> linear; logits (b, c)."""

    def __init__(self, pooler: Pooler, dim: int, num_labels: int, *, dropout: float) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, nn.Dropout(dropout), nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.classifier(self.dropout(self.pooler(hidden, attention_mask)))


class TokenClassificationHead(nn.Module):
    """A label per token; logits (b, n, c)."""

    def __init__(self, dim: int, num_labels: int, *, dropout: float) -> None:
        super().__init__()
        self.dropout, self.classifier = nn.Dropout(dropout), nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.classifier(self.dropout(hidden))


class EmbeddingHead(nn.Module):
    """Sentence embeddings (b, d): pooled (CLS or mean over real tokens), optionally L2-normalised."""

    def __init__(self, pooler: Pooler, *, normalize: bool = True) -> None:
        super().__init__()
        self.pooler, self.normalize = pooler, normalize

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        out = self.pooler(hidden, attention_mask)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


class EncoderModel(PretrainedIO, nn.Module):
    """Bidirectional encoder: embeddings -> blocks -> (final norm) -> head."""

    causal = False

    def __init__(
        self, config: ModelConfig, embed: Embeddings, positional: PositionalEncoding, stack: Stack, head: nn.Module
    ) -> None:
        super().__init__()
        self.config = config
        self.embed, self.positional, self.stack, self.head = embed, positional, stack, head

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random tokens, `length` of them (default: the context)."""
        return (random_tokens(self, batch, generator, length),)

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        token_types: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_store: list | None = None,
        graph: Tensor | None = None,
    ) -> Tensor:
        """tokens (b, n) -> the head's output (hidden (b, n, d) with head 'none')."""
        hidden = self.hidden(
            tokens, attention_mask, token_types=token_types, positions=positions, attn_mask=attn_mask, attn_store=attn_store,
            graph=graph,
        )
        return self.head(hidden, attention_mask)

    def hidden(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        token_types: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_store: list | None = None,
        graph: Tensor | None = None,
    ) -> Tensor:
        """tokens (b, n) -> final hidden states (b, n, d).

        graph: the directed graph over the tokens that graph positional encodings read, in the
        attn_mask convention (bool, True at [i, j] for the edge j -> i); default `attn_mask`
        (pass it when attention is restricted to a different, e.g. symmetrised, graph)."""
        ctx = self_attention_context(
            tokens,
            self.positional,
            causal=False,
            num_heads=self.config.attention.num_heads,
            positions=positions,
            attention_mask=attention_mask,
            attn_mask=attn_mask,
            store=attn_store,
        )
        x = self.embed(tokens, ctx.q_pos, self.positional, token_types, graph=attn_mask if graph is None else graph)
        return self.stack(x, ctx)

    @torch.no_grad()
    def embed_sentences(self, tokens: Tensor, attention_mask: Tensor | None = None, *, pooling: str = "mean", normalize: bool = True) -> Tensor:
        """Pooled sentence embeddings (b, d) from the final hidden states, whatever the head."""
        out = pool(self.hidden(tokens, attention_mask), attention_mask, pooling)
        return nn.functional.normalize(out, dim=-1) if normalize else out


@HEADS.register("none")
def build_no_head(parts: Parts, embed: Embeddings) -> nn.Module:
    """The final hidden states themselves."""
    return NoHead()


@HEADS.register("mlm")
def build_mlm_head(parts: Parts, embed: Embeddings) -> nn.Module:
    """BERT's masked-LM head, tied to the token embedding when the config says so."""
    cfg = parts.cfg
    return MaskedLMHead(cfg.dim, cfg.vocab_size, norm=parts.norm(), tied=embed.tokens if cfg.tie_embeddings else None)


@HEADS.register("sequence_classification")
def build_sequence_classification_head(parts: Parts, embed: Embeddings) -> nn.Module:
    """Pooled ([CLS] or mean) sequence classification."""
    cfg, h = parts.cfg, parts.cfg.head
    return SequenceClassificationHead(Pooler(cfg.dim, pooling=h.pooling, dense=h.pooler), cfg.dim, h.num_labels, dropout=cfg.dropout)


@HEADS.register("token_classification")
def build_token_classification_head(parts: Parts, embed: Embeddings) -> nn.Module:
    """A label per token."""
    return TokenClassificationHead(parts.cfg.dim, parts.cfg.head.num_labels, dropout=parts.cfg.dropout)


@HEADS.register("embedding")
def build_embedding_head(parts: Parts, embed: Embeddings) -> nn.Module:
    """Pooled sentence embeddings."""
    cfg, h = parts.cfg, parts.cfg.head
    return EmbeddingHead(Pooler(cfg.dim, pooling=h.pooling, dense=h.pooler), normalize=h.normalize)


@ARCHITECTURES.register("encoder")
def build_encoder(cfg: ModelConfig, parts: Parts) -> EncoderModel:
    """A bidirectional encoder (BERT) with the configured head."""
    embed = parts.embeddings()
    stack = parts.stack(cfg.num_layers, causal=False, name="encoder")
    return EncoderModel(cfg, embed, parts.positional(causal=False), stack, parts.head(embed))
