"""Key/value caches for incremental decoding: preallocated, and rolling (attention sinks plus a
recent window, StreamingLLM, Xiao et al. 2023) for generating past the context length.

Legend: `b` batch, `g` key/value heads, `L` cache capacity, `d` head dim, `n` new tokens,
`S` sink slots, `W` window slots.

A rolling cache keeps the first S slots forever and the W most recent tokens after them.
Positions are assigned by slot, not by the token's place in the whole text: the key in slot j
sits at position j (counting only real, non-padding slots of its row), so a model never sees a
position past S + W - 1. Keys are stored before the positional rotation and rotated at read
time by their current slot position, so eviction only shifts slots.

Models build their caches from a `CacheSpec`: each layer's attention module turns it into the
cache it needs (`make_cache(spec)`), so a kind with its own state works with every spec.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        n, start, ck, cv = k.shape[2], self.start, self.k, self.v
        end = start + n
        if end > ck.shape[2]:
            raise ValueError(
                f"KV cache holds {ck.shape[2]} positions; cannot add {n} tokens after {start}. "
                "Allocate a larger cache or use a rolling (sink + window) cache"
            )
        ck[:, :, start:end] = k  # the copy casts to the cache's dtype (a wider cache holds bf16 values exactly)
        cv[:, :, start:end] = v
        self.start = end
        return ck[:, :, :end], cv[:, :, :end]

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
    `rows`: per-sequence state a model keeps between steps (name -> a tensor whose first dimension
    is the batch), reordered with the layers.
    """

    def __init__(self, layers: list[nn.Module], cross: list[CrossKVCache] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.cross = nn.ModuleList(cross or [])
        b, L, device = layers[0].batch, layers[0].max_len, layers[0].device
        self.register_buffer("positions", torch.zeros(b, L, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("keep", torch.ones(b, L, dtype=torch.bool, device=device), persistent=False)
        self.length = 0
        self.rows: dict[str, Tensor] = {}

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
        self.rows = {name: t.index_select(0, index) for name, t in self.rows.items()}


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

    def __init__(self, layers: list[nn.Module], cross: list[CrossKVCache] | None = None, *, sinks: int, window: int) -> None:
        super().__init__(layers, cross)
        self.sinks, self.window = sinks, window

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


class LambdaKVCache(KVCache):
    """One layer's keys (rotated at their true positions) and values for Λ-shaped attention
    (LM-Infinite): the first `sinks` tokens forever, and before each call of up to `window` new
    tokens the `window` - 1 most recent ones (all that a query of the call may see locally)."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, sinks: int, window: int, dtype: torch.dtype, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(batch, num_kv_heads, sinks + 2 * window - 1, head_dim, dtype=dtype, device=device)
        self.sinks, self.window = sinks, window

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Evict the middle (keys no new query can see), then write (b, g, n, d) keys/values."""
        n = k.shape[2]
        if n > self.window:
            raise ValueError(f"a Λ cache with window {self.window} takes at most {self.window} tokens per call, got {n}")
        drop = max(0, self.start - self.sinks - (self.window - 1))
        _evict(self.k, 2, self.sinks, self.start, drop)
        _evict(self.v, 2, self.sinks, self.start, drop)
        self.start -= drop
        return super().update(k, v)


class LambdaModelCache(ModelCache):
    """Λ layer caches plus the true positions and key padding of the slots they keep, evicted in
    step with them; positions count every token seen, evicted ones included."""

    def __init__(self, layers: list[nn.Module], cross: list[CrossKVCache] | None = None, *, sinks: int, window: int) -> None:
        super().__init__(layers, cross)
        self.sinks, self.window = sinks, window
        self.register_buffer("seen", torch.zeros(self.positions.shape[0], 1, dtype=torch.long, device=self.positions.device),
                             persistent=False)

    def next_positions(self, keep: Tensor) -> Tensor:
        """True positions (b, n) of n new tokens: each row counts all its real tokens so far."""
        return (self.seen + keep.long().cumsum(-1) - 1).clamp(min=0)

    def append_positions(self, positions: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        n = positions.shape[1]
        if n > self.window:
            raise ValueError(f"a Λ cache with window {self.window} takes at most {self.window} tokens per call, got {n}")
        drop = max(0, self.length - self.sinks - (self.window - 1))
        _evict(self.positions, 1, self.sinks, self.length, drop)
        _evict(self.keep, 1, self.sinks, self.length, drop)
        self.length -= drop
        self.seen += n if keep is None else keep.long().sum(-1, keepdim=True)
        return super().append_positions(positions, keep)

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.seen = self.seen.index_select(0, index)


@dataclass(frozen=True)
class CacheSpec:
    """What kind of decoding cache to build: `batch` rows of up to `max_len` positions, in
    `dtype` on `device`; with `window` set, a rolling cache of `sinks` first tokens plus the
    `window` most recent ones (max_len is then ignored), at positions re-assigned by slot, or
    with `true_positions` a Λ cache keeping each token's own position (for LM-Infinite)."""

    batch: int
    max_len: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    window: int | None = None
    sinks: int = 4
    true_positions: bool = False

    def kv_cache(self, num_kv_heads: int, head_dim: int) -> KVCache:
        """A key/value cache of one layer with `num_kv_heads` heads of width `head_dim`."""
        if self.window is None:
            return KVCache(self.batch, num_kv_heads, self.max_len, head_dim, dtype=self.dtype, device=self.device)
        if self.true_positions:
            return LambdaKVCache(self.batch, num_kv_heads, head_dim, sinks=self.sinks, window=self.window, dtype=self.dtype, device=self.device)
        return RollingKVCache(self.batch, num_kv_heads, head_dim, sinks=self.sinks, window=self.window, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        """Positions a layer cache of this spec holds."""
        if self.window is None:
            return self.max_len
        return self.sinks + (2 * self.window - 1 if self.true_positions else self.window)

    def model_cache(self, layers: list[nn.Module], cross: list[CrossKVCache] | None = None) -> "ModelCache":
        """The whole model's cache over per-layer caches built from this spec."""
        if self.window is None:
            return ModelCache(layers, cross)
        if self.true_positions:
            return LambdaModelCache(layers, cross, sinks=self.sinks, window=self.window)
        return RollingModelCache(layers, cross, sinks=self.sinks, window=self.window)
