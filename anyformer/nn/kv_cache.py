"""Preallocated key/value caches for incremental decoding.

Legend: `b` batch, `g` key/value heads, `L` cache capacity, `d` head dim, `n` new tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def match_cache_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One dtype for the attention kernel when the cache is kept wider than the model (an fp32
    cache for a bf16 model: storing bf16 keys in fp32 is exact). A one-query decoding step
    attends in the cache's dtype (cheap: q is one row); a multi-token call (prefill) brings the
    keys/values to q's dtype, so fused kernels see the model's dtype."""
    if k.dtype == q.dtype:
        return q, k, v
    if q.shape[2] == 1:
        return q.to(k.dtype), k, v
    return q, k.to(q.dtype), v.to(q.dtype)


class KVCache(nn.Module):
    """One self-attention layer's keys and values, preallocated to `max_len` positions.

    Buffers are non-persistent: a checkpoint never holds a cache.
    """

    def __init__(
        self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.start = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (b, g, n, d) new keys/values at the current length; return all (b, g, start+n, d)."""
        n = k.shape[2]
        end = self.start + n
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions; cannot add {n} tokens after {self.start}. "
                "Allocate a larger cache or use a rolling (sink + window) cache"
            )
        self.k[:, :, self.start : end] = k.to(self.k.dtype)
        self.v[:, :, self.start : end] = v.to(self.v.dtype)
        self.start = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def store(self, q: Tensor, k: Tensor, v: Tensor, ctx) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
        """Position the new q (b, h, n, d) and k (b, g, n, d) with `ctx.positional`, cache k/v;
        return q and all cached keys/values (b, g, m, d)."""
        q, k = ctx.positional.rotate(q, k, ctx.q_pos, ctx.q_pos)
        k, v = self.update(k, v)
        return match_cache_dtype(q, k, v)

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (b',) of the batch, in that order (beam search)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class CrossKVCache(nn.Module):
    """Cross-attention keys/values of the encoder output, computed once and reused."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def get_or_compute(self, compute) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
        """The stored (k, v), computing and storing them with `compute()` on first use."""
        if self.k is None:
            self.k, self.v = compute()
        return self.k, self.v  # type: ignore[return-value]

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (b',) of the batch, in that order (beam search)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)  # type: ignore[union-attr]


class ModelCache(nn.Module):
    """All layers' caches plus the positions and key padding of everything cached so far.

    A layer cache is any module with `batch`, `max_len` and `device` (KVCache, or the state an
    attention kind's `make_cache` returns). positions: (b, L) position of each cached slot; keep: (b, L) True for real (non-pad) tokens.
    """

    def __init__(self, layers: list[nn.Module], cross: list[CrossKVCache] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.cross = nn.ModuleList(cross or [])
        b, L, device = layers[0].batch, layers[0].max_len, layers[0].device
        self.register_buffer("positions", torch.zeros(b, L, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("keep", torch.ones(b, L, dtype=torch.bool, device=device), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def append_positions(self, positions: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Record (b, n) positions and key padding of new tokens; return those of all cached keys."""
        n = positions.shape[1]
        end = self.length + n
        if end > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions; {self.length} are used and {n} more "
                "were given. Allocate a larger cache (max_len) or use a rolling cache"
            )
        self.positions[:, self.length : end] = positions
        self.keep[:, self.length : end] = True if keep is None else keep.bool()
        self.length = end
        return self.positions[:, :end], self.keep[:, :end]

    def next_positions(self, keep: Tensor) -> Tensor:
        """Positions (b, n) of n new tokens with key padding `keep` (b, n): each row counts only
        its real tokens, so a left-padded row starts at 0 at its first real token."""
        cached = self.keep[:, : self.length].sum(-1, keepdim=True)  # (b, 1)
        return (cached + keep.long().cumsum(-1) - 1).clamp(min=0)

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (b',) of the batch in every layer, in that order (beam search)."""
        for layer in list(self.layers) + list(self.cross):
            layer.reorder(index)
        self.positions = self.positions.index_select(0, index)
        self.keep = self.keep.index_select(0, index)


def make_layer_cache(
    attn: nn.Module, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """One self-attention layer's cache: the attention module's own `make_cache` when it has one
    (e.g. a constant-size recurrent state), else a preallocated KVCache."""
    make = getattr(attn, "make_cache", None)
    if make is not None:
        return make(batch, max_len, dtype=dtype, device=device)
    return KVCache(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
