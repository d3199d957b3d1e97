"""Positional encodings: each one acts on the input, on queries/keys, or as a logit bias.

Legend: `b` batch, `h` heads, `n` query length, `m` key length, `d` width.
Positions are integer tensors of shape (b, n) (absolute token positions).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...registry import Registry

POSITIONALS: Registry[type["PositionalEncoding"]] = Registry("positional encoding")


@dataclass
class PositionalContext:
    """What every positional encoding may need from the model around it."""

    dim: int
    num_heads: int
    head_dim: int
    max_seq_len: int
    causal: bool


class PositionalEncoding(nn.Module):
    """Base class: acts nowhere. Subclasses override the hooks they act through.

    Each subclass declares `Options`, a dataclass of its own settings, and is built as
    `cls(context, options)`.
    """

    @dataclass
    class Options:
        pass

    def __init__(self, ctx: PositionalContext, options: "PositionalEncoding.Options") -> None:
        super().__init__()
        self.ctx = ctx
        self.options = options

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Input side: (b, n, d) embeddings and (b, n) positions -> (b, n, d)."""
        return x

    def embed_graph(self, x: Tensor, positions: Tensor, graph: Tensor | None) -> Tensor:
        """Input side, for encodings of a graph over the tokens: `graph` is the user's attention
        mask (bool, True = query i attends key j, broadcastable to (b, h, n, n)) or None.
        Encodings that do not read the graph ignore it (the default calls `embed`)."""
        return self.embed(x, positions)

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Query/key side: (b, h, n, d) and (b, h_kv, m, d) with their positions."""
        return q, k

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """Logit side: an additive (b, h, n, m) bias for (b, n) and (b, m) positions, or None."""
        return None

    #: True when `query_bias` adds a term (attention then computes it per layer from its queries)
    query_aware: bool = False

    def query_bias(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor | None:
        """Logit side, from the queries: an additive (b, h, n, m) term computed from the layer's
        queries q (b, h, n, d, after `rotate`) and the (b, n) / (b, m) positions, already
        multiplied by the attention's logit `scale` (a relative encoding's key term: q_i . a_{j-i}
        of Shaw et al. 2018 or the Music Transformer). Positions are absolute, cached keys
        included, so the term is the same with a KV cache. None by default; an encoding that
        adds one sets `query_aware`."""
        return None

    #: True when `value_term` adds to the attention output (attention then hands it its probabilities)
    value_aware: bool = False

    def value_term(self, p: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """Output side, from the attention probabilities: an additive (b, h, n, d) term of the
        attention output computed from p (b, h, n, m) and the positions, linear in p (Shaw et
        al. 2018's value term, sum_j p_ij a^V_{j-i}). The chunked kernel calls it with one
        block's unnormalised weights and rescales it with the block's values, so it must be
        linear in p. None by default; an encoding that adds one sets `value_aware`."""
        return None

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """FLOPs per query token per attention layer that the query-aware and value terms add
        (the model summary adds them to each self-attention layer's cost); 0 by default. An
        encoding that declares a cost has its parameters left out of the summary's weights."""
        return 0.0


@POSITIONALS.register("none")
class NoPositional(PositionalEncoding):
    """No positional information: the encoder is then permutation-equivariant."""


def uses_absolute_positions(positional: PositionalEncoding) -> bool:
    """True when the encoding adds absolute position embeddings to the input (so cached
    positions cannot be re-assigned, as a rolling cache does)."""
    return type(positional).embed is not PositionalEncoding.embed
