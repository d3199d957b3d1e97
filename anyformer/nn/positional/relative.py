"""Relative-position attention as positional encodings: learned embeddings of the distance
between a query and a key, read by each layer's queries (and, for Shaw et al., added to the
values), rather than a bias computed from the positions alone.

Legend: `b` batch, `h` heads, `n` queries, `m` keys, `d` head width, `R` distances in a table.

- `shaw` (Shaw, Uszkoreit & Vaswani 2018): embeddings a^K_r and a^V_r of r = clip(j - i, -k, k),
  shared by the heads; the logit of query i and key j gains q_i . a^K_r and the output of
  query i gains sum_j p_ij a^V_r.
- `music_relative` (Huang et al. 2018, the Music Transformer): one embedding E_r per head and
  distance r = j - i, for every distance a context holds (clipped at +-(max_seq_len - 1)); the
  logit gains q_i . E_r.

Neither forms the (n, m, d) tensor of the embedding of every pair. The key term multiplies the
queries by the R table rows the pairs' distances span, (b, h, n, R), and picks each pair's entry
from it: the Music Transformer's "skewing", done as a gather, which also holds for positions
that are not consecutive (a rolling cache). The value term sums each query's probabilities per
distance, (b, h, n, R), and multiplies the sums by the value table. In the chunked kernel both
are asked for one block at a time (anyformer/nn/attention/chunked.py), so memory stays O(n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ConfigError
from .base import POSITIONALS, PositionalContext, PositionalEncoding


def distances(q_pos: Tensor, k_pos: Tensor, limit: int) -> Tensor:
    """(b, n, m) distances j - i of keys from queries, clipped to [-limit, limit]."""
    return (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-limit, limit)


def distance_span(queries: int, keys: int, limit: int) -> int:
    """How many clipped distances the last `queries` of `keys` positions have to all the keys
    (the table rows `relative_logits` multiplies): from -(keys - 1) to queries - 1, clipped."""
    return min(queries - 1, limit) - max(-(keys - 1), -limit) + 1


def relative_logits(q: Tensor, table: Tensor, rel: Tensor, limit: int) -> Tensor:
    """q . table[rel] for every (query, key) pair without the (n, m, d) gather.

    q: (b, h, n, d); table: (2 * limit + 1, d) shared by the heads, or (h, 2 * limit + 1, d) one
    per head, row r + limit holding distance r; rel: (b, n, m) clipped distances. Only the rows
    between the smallest and the largest distance present are multiplied. Returns (b, h, n, m)."""
    lo, hi = int(rel.min()), int(rel.max())
    rows = table[..., lo + limit : hi + limit + 1, :].to(q.dtype)  # (R, d) or (h, R, d)
    by_distance = q @ rows.transpose(-1, -2)  # (b, h, n, R)
    index = (rel - lo)[:, None].expand(-1, q.shape[1], -1, -1)  # (b, h, n, m)
    return by_distance.gather(-1, index)


def relative_values(p: Tensor, table: Tensor, rel: Tensor, limit: int) -> Tensor:
    """sum_j p_ij table[rel_ij] without the (n, m, d) gather: the probabilities summed per
    distance, then multiplied by the table rows. p: (b, h, n, m); returns (b, h, n, d)."""
    lo, hi = int(rel.min()), int(rel.max())
    index = (rel - lo)[:, None].expand(-1, p.shape[1], -1, -1)  # (b, h, n, m)
    sums = p.new_zeros(*p.shape[:3], hi - lo + 1).scatter_add_(-1, index, p)  # (b, h, n, R)
    return sums @ table[..., lo + limit : hi + limit + 1, :].to(p.dtype)


@POSITIONALS.register("shaw")
class ShawRelative(PositionalEncoding):
    """Shaw et al. 2018: learned key and value embeddings of the clipped distance j - i, shared
    by the heads and the layers of a stack (as T5's bias is; the paper learns one per layer).

    Options: `max_distance` k (distances beyond +-k share the last embedding), `values`
    (the value term; off leaves the key term alone, the form of most later uses)."""

    query_aware = True

    @dataclass
    class Options:
        max_distance: int = 16
        values: bool = True

    def __init__(self, ctx: PositionalContext, options: "ShawRelative.Options") -> None:
        super().__init__(ctx, options)
        if options.max_distance < 1:
            raise ConfigError(f"model.positional.options.max_distance must be at least 1 (the largest distance told apart), "
                              f"got {options.max_distance}")
        rows = 2 * options.max_distance + 1
        self.keys = nn.Parameter(torch.randn(rows, ctx.head_dim) * ctx.head_dim**-0.5)
        self.values = nn.Parameter(torch.randn(rows, ctx.head_dim) * ctx.head_dim**-0.5) if options.values else None
        self.value_aware = options.values

    def query_bias(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
        k = self.options.max_distance
        return relative_logits(q, self.keys, distances(q_pos, k_pos, k), k) * scale

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Each query times the table rows its distances span, per head, for the key term and
        (when on) the probabilities' sums times the same rows for the value term."""
        rows = distance_span(queries, keys, self.options.max_distance)
        return 2.0 * self.ctx.num_heads * self.ctx.head_dim * rows * (2 if self.values is not None else 1)

    def value_term(self, p: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        if self.values is None:
            return None
        k = self.options.max_distance
        return relative_values(p, self.values, distances(q_pos, k_pos, k), k)


@POSITIONALS.register("music_relative")
class MusicRelative(PositionalEncoding):
    """The Music Transformer's relative attention (Huang et al. 2018): a learned embedding per
    head and distance, for every distance within the context (+-(max_seq_len - 1)), read by the
    queries; shared by the layers of a stack."""

    query_aware = True

    def __init__(self, ctx: PositionalContext, options: PositionalEncoding.Options) -> None:
        super().__init__(ctx, options)
        self.limit = max(ctx.max_seq_len - 1, 1)
        self.table = nn.Parameter(torch.randn(ctx.num_heads, 2 * self.limit + 1, ctx.head_dim) * ctx.head_dim**-0.5)

    def query_bias(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
        return relative_logits(q, self.table, distances(q_pos, k_pos, self.limit), self.limit) * scale

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Each query times its head's table rows that its distances span."""
        return 2.0 * self.ctx.num_heads * self.ctx.head_dim * distance_span(queries, keys, self.limit)
