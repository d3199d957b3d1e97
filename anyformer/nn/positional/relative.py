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


def _layout(q_pos: Tensor, k_pos: Tensor, limit: int) -> tuple[str, int, int]:
    """How the distances of a (block of) queries and keys are laid out: ("constant", d, d) when
    every pair's clipped distance is the same d (a block far from the diagonal, for a clipped
    table); ("skew", lo, hi) when every row's positions are consecutive with one query-key
    offset, so that pair (i, j) has distance lo + (j - i + n - 1) before clipping; else
    ("gather", lo, hi) with the clipped extremes."""
    lo_raw = int(k_pos.min() - q_pos.max())
    hi_raw = int(k_pos.max() - q_pos.min())
    lo, hi = max(lo_raw, -limit), min(hi_raw, limit)
    if lo >= hi:
        return "constant", lo, lo
    n, m = q_pos.shape[1], k_pos.shape[1]
    steps_q, steps_k = q_pos[:, 1:] - q_pos[:, :-1], k_pos[:, 1:] - k_pos[:, :-1]
    offsets = k_pos[:, 0] - q_pos[:, 0]
    if n > 1 and bool((steps_q == 1).all()) and bool((steps_k == 1).all()) and bool((offsets == offsets[0]).all()) \
            and lo_raw == int(offsets[0]) - (n - 1) and hi_raw == int(offsets[0]) + m - 1:
        return "skew", lo_raw, hi_raw
    return "gather", lo, hi


def _skewed(x: Tensor, n: int, m: int) -> Tensor:
    """The (..., n, m) view of x (..., n, n + m - 1) whose (i, j) entry is x[..., i, j - i + n - 1]:
    the Music Transformer's skewing, as a strided view (no copy). x must be contiguous."""
    r = x.shape[-1]
    lead = x.shape[:-2]
    strides = tuple(x.stride()[:-2]) + (r - 1, 1)
    return x.as_strided((*lead, n, m), strides, x.storage_offset() + n - 1)


def relative_logits(q: Tensor, table: Tensor, q_pos: Tensor, k_pos: Tensor, limit: int) -> Tensor:
    """q_i . table[clip(j - i)] for every (query, key) pair without the (n, m, d) gather.

    q: (b, h, n, d); table: (2 * limit + 1, d) shared by the heads, or (h, 2 * limit + 1, d) one
    per head, row r + limit holding distance r; q_pos (b, n), k_pos (b, m). Only the table rows
    the pairs' distances span are multiplied by the queries, (b, h, n, R); each pair's entry is
    then read by a strided view (skewing) when the positions are consecutive, else gathered. A
    block whose pairs all clip to one distance gives (b, h, n, 1), broadcast over the keys.
    Returns a tensor broadcastable to (b, h, n, m)."""
    n, m = q.shape[2], k_pos.shape[1]
    how, lo, hi = _layout(q_pos, k_pos, limit)
    if how == "constant":
        return q @ table[..., lo + limit : lo + limit + 1, :].to(q.dtype).transpose(-1, -2)  # (b, h, n, 1)
    if how == "skew":  # rows for every unclipped distance lo..hi (those beyond the clip repeat the edge row)
        rows = table[..., (torch.arange(lo, hi + 1, device=q.device).clamp(-limit, limit) + limit), :].to(q.dtype)
        return _skewed((q @ rows.transpose(-1, -2)).contiguous(), n, m)
    rel = distances(q_pos, k_pos, limit)
    by_distance = q @ table[..., lo + limit : hi + limit + 1, :].to(q.dtype).transpose(-1, -2)  # (b, h, n, R)
    return by_distance.gather(-1, (rel - lo)[:, None].expand(-1, q.shape[1], -1, -1))


def relative_values(p: Tensor, table: Tensor, q_pos: Tensor, k_pos: Tensor, limit: int) -> Tensor:
    """sum_j p_ij table[clip(j - i)] without the (n, m, d) gather: the probabilities summed per
    distance (b, h, n, R), then multiplied by the table rows (skewed back into place with a
    strided view when positions are consecutive; a row sum when every pair clips to one
    distance). p: (b, h, n, m); returns (b, h, n, d)."""
    n, m = p.shape[2], p.shape[3]
    how, lo, hi = _layout(q_pos, k_pos, limit)
    if how == "constant":
        return p.sum(-1, keepdim=True) @ table[..., lo + limit : lo + limit + 1, :].to(p.dtype)
    if how == "skew":
        sums = p.new_zeros(*p.shape[:2], n, n + m - 1)
        _skewed(sums, n, m).copy_(p)  # each (i, distance) holds the one key at that distance
        rows = table[..., (torch.arange(lo, hi + 1, device=p.device).clamp(-limit, limit) + limit), :].to(p.dtype)
        return sums @ rows
    rel = distances(q_pos, k_pos, limit)
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
        return relative_logits(q, self.keys, q_pos, k_pos, k) * scale

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Each query times the table rows its distances span, per head, for the key term and
        (when on) the probabilities' sums times the same rows for the value term."""
        rows = distance_span(queries, keys, self.options.max_distance)
        return 2.0 * self.ctx.num_heads * self.ctx.head_dim * rows * (2 if self.values is not None else 1)

    def value_term(self, p: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        if self.values is None:
            return None
        k = self.options.max_distance
        return relative_values(p, self.values, q_pos, k_pos, k)


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
        return relative_logits(q, self.table, q_pos, k_pos, self.limit) * scale

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Each query times its head's table rows that its distances span."""
        return 2.0 * self.ctx.num_heads * self.ctx.head_dim * distance_span(queries, keys, self.limit)
