"""Encoder-only model (BERT) and its output heads.

Legend: `b` batch, `n` length, `d` width, `V` vocabulary, `c` labels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.positional import PositionalEncoding
from ..registry import Registry
from .common import PretrainedIO, Embeddings, Stack, self_attention_context

HEADS: Registry[type[nn.Module]] = Registry("encoder head")


def pool(hidden: Tensor, attention_mask: Tensor | None, kind: str) -> Tensor:
    """(b, n, d) -> (b, d): the first ([CLS]) token, or the mean over real tokens."""
    if kind == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    w = attention_mask.to(hidden.dtype)[..., None]  # (b, n, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


@HEADS.register("none")
class NoHead(nn.Module):
    """Returns the final hidden states (b, n, d)."""

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return hidden


@HEADS.register("mlm")
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


@HEADS.register("sequence_classification")
class SequenceClassificationHead(nn.Module):
    """Pooled vector -> dropout -> linear; logits (b, c)."""

    def __init__(self, pooler: Pooler, dim: int, num_labels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, nn.Dropout(dropout), nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.classifier(self.dropout(self.pooler(hidden, attention_mask)))


@HEADS.register("token_classification")
class TokenClassificationHead(nn.Module):
    """A label per token; logits (b, n, c)."""

    def __init__(self, dim: int, num_labels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout, self.classifier = nn.Dropout(dropout), nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.classifier(self.dropout(hidden))


@HEADS.register("embedding")
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

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        token_types: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_store: list | None = None,
    ) -> Tensor:
        """tokens (b, n) -> the head's output (hidden (b, n, d) with head 'none')."""
        hidden = self.hidden(
            tokens, attention_mask, token_types=token_types, positions=positions, attn_mask=attn_mask, attn_store=attn_store
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
    ) -> Tensor:
        """tokens (b, n) -> final hidden states (b, n, d)."""
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
        x = self.embed(tokens, ctx.q_pos, self.positional, token_types)
        return self.stack(x, ctx)

    @torch.no_grad()
    def embed_sentences(self, tokens: Tensor, attention_mask: Tensor | None = None, *, pooling: str = "mean", normalize: bool = True) -> Tensor:
        """Pooled sentence embeddings (b, d) from the final hidden states, whatever the head."""
        out = pool(self.hidden(tokens, attention_mask), attention_mask, pooling)
        return nn.functional.normalize(out, dim=-1) if normalize else out
