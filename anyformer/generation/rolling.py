"""A rolling key/value cache of attention sinks plus a recent window, for generating past
the context length (StreamingLLM, Xiao et al. 2023).

Legend: `b` batch, `g` key/value heads, `d` head dim, `n` new tokens, `S` sink slots,
`W` window slots, `C = S + W` capacity, `m` filled slots.

The cache keeps the first S slots forever and the W most recent tokens after them. Positions
are assigned by slot, not by the token's place in the whole text: the key in slot j sits at
position j (counting only real, non-padding slots of its row), so a model never sees a
position past C - 1. Keys are stored before the positional rotation and rotated at read time
by their current slot position, so eviction only shifts slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.kv_cache import CrossKVCache, KVCache, ModelCache


def _evict(buf: Tensor, dim: int, sinks: int, used: int, drop: int) -> None:
    """Shift slots [sinks + drop, used) down to [sinks, used - drop) along `dim`, in place."""
    if drop <= 0:
        return
    src = buf.narrow(dim, sinks + drop, used - sinks - drop).clone()
    buf.narrow(dim, sinks, used - sinks - drop).copy_(src)


class RollingKVCache(KVCache):
    """One layer's keys (un-rotated) and values in S sink slots plus a W-slot recent window."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, sinks: int, window: int, dtype: torch.dtype, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(batch, num_kv_heads, sinks + window, head_dim, dtype=dtype, device=device)
        self.sinks, self.window = sinks, window

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (b, g, n, d) keys/values, evicting the oldest non-sink slots when full."""
        n = k.shape[2]
        if n > self.window:
            raise ValueError(f"a rolling cache with window {self.window} takes at most {self.window} tokens per call, got {n}")
        drop = max(0, self.start + n - self.max_len)
        _evict(self.k, 2, self.sinks, self.start, drop)
        _evict(self.v, 2, self.sinks, self.start, drop)
        self.start -= drop
        return super().update(k, v)

    def store(self, q: Tensor, k: Tensor, v: Tensor, ctx) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
        """Cache un-rotated k/v, then position q at ctx.q_pos and every cached key at its slot
        position ctx.k_pos (b, m)."""
        k_all, v_all = self.update(k, v)
        q, k_all = ctx.positional.rotate(q, k_all, ctx.q_pos, ctx.k_pos)
        return q, k_all, v_all


class RollingModelCache(ModelCache):
    """Rolling layer caches plus slot positions and key padding, evicted in step with them."""

    def __init__(self, layers: list[RollingKVCache], cross: list[CrossKVCache] | None = None) -> None:
        super().__init__(layers, cross)  # type: ignore[arg-type]
        self.sinks, self.window = layers[0].sinks, layers[0].window

    def _drop(self, n: int) -> int:
        return max(0, self.length + n - self.max_len)

    def next_positions(self, keep: Tensor) -> Tensor:
        """Slot positions (b, n) that n new tokens will get, after eviction."""
        drop = self._drop(keep.shape[1])
        kept = self.keep[:, : self.length].clone()
        kept[:, self.sinks : self.sinks + drop] = False
        cached = kept.sum(-1, keepdim=True)  # (b, 1)
        return (cached + keep.long().cumsum(-1) - 1).clamp(min=0)

    def append_positions(self, positions: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Evict, append the new tokens' padding, and re-assign every slot's position by slot."""
        n = positions.shape[1]
        if n > self.window:
            raise ValueError(f"a rolling cache with window {self.window} takes at most {self.window} tokens per call, got {n}")
        drop = self._drop(n)
        _evict(self.keep, 1, self.sinks, self.length, drop)
        self.length -= drop
        end = self.length + n
        self.keep[:, self.length : end] = True if keep is None else keep.bool()
        self.length = end
        self.positions[:, :end] = (self.keep[:, :end].long().cumsum(-1) - 1).clamp(min=0)
        return self.positions[:, :end], self.keep[:, :end]


def rolling_cache(
    batch: int, num_layers: int, num_kv_heads: int, head_dim: int, *, sinks: int, window: int, dtype: torch.dtype, device=None, cross: bool = False
) -> RollingModelCache:  # type: ignore[no-untyped-def]
    """A RollingModelCache of `num_layers` layers (with cross-attention caches when `cross`)."""
    layers = [
        RollingKVCache(batch, num_kv_heads, head_dim, sinks=sinks, window=window, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]
    return RollingModelCache(layers, [CrossKVCache() for _ in range(num_layers)] if cross else None)
