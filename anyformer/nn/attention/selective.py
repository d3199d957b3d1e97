"""Selective attention (Leviathan, Kalman and Matias 2024, "Selective Attention Improves
Transformer"): a parameter-free soft mask that lets a token stop later tokens from attending to
earlier ones.

Legend: `b` batch, `h` query heads, `g` key/value heads, `n` queries (the last n of m
positions), `m` keys, `d` head dim, `L` cache capacity.

With `logits` the (b, h, n, m) scaled logits (positional biases added, before the mask):

    S[i, j] = ReLU(logits[head][i, j])   for keys j the query may see, j != i, pos(j) != 0
            = 0                          otherwise (future, padding, itself, the first token)
    F[i, j] = sum over i' < i of S[i', j]          (exclusive cumulative sum over queries)
    logits' = logits - F                           for every head, head `head` included

then the usual mask and softmax. Conventions, following the paper's sketch (its Figure 2):
the score comes from one head's logits (head 0 by default), the constraints (causal and padding
mask, no self-masking, never the first token) are applied to S before the cumulative sum, and the
sum is exclusive (row i gets rows < i), so a token affects only tokens after it. "The first
token" is the key at position 0 of its row (the BOS; with left padding, the first real token).
x-transformers (`x_transformers.attend.selective_attn`) matches this for a full sequence (n = m);
it zeroes the column of the first *query* and does not define the n < m (cached) case, which is
why it disables its KV cache for selective attention.

Cached decoding: `SelectiveKVCache` keeps, next to keys and values, the running sum over all
earlier query rows of S for every cached key, (b, L) in fp32: the F row of the next query. A call
of n new queries (one token, a prompt, or a chunk of one) starts from it, accumulates its own rows
and leaves the sum for the next call, so cached decoding equals a full recompute.

Context pruning (the paper's section 4): with `prune_threshold` t, a key whose F passes t is
masked for that query and, F only growing down the rows, for every later one. The mask is applied
in every call (training included); with a cache, after each call the keys whose running sum
passed t are dropped and the rest compacted to the front (the cache's buffers grow on demand,
so the memory held follows the keys kept). The cached keys are then fewer than the positions:
the layer addresses them by slot, with each slot's column in the model's position arrays, so
a pruned cached run still equals a full recompute. `benchmarks/selective_pruning.py` measures
the memory saved against the loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..kv_cache import CacheSpec, KVCache
from .context import AttentionContext
from .kernels import full_mask
from .mha import MultiHeadAttention, mha_from_config
from .registry import ATTENTIONS


def selection_scores(head_logits: Tensor, allowed: Tensor | None, k_pos: Tensor) -> Tensor:
    """The paper's S: ReLU of one head's logits (b, n, m), zero except at keys strictly before
    the query (the queries are the last n of m positions), allowed by `allowed` (bool,
    broadcastable to (b, n, m)) and not at position 0 of `k_pos` (b, m)."""
    n, m = head_logits.shape[-2:]
    i = torch.arange(n, device=head_logits.device)[:, None] + (m - n)  # query index in key coordinates
    j = torch.arange(m, device=head_logits.device)[None, :]
    keep = (j < i) & (k_pos != 0)[:, None, :]  # (b, n, m): earlier keys, never itself or the first token
    if allowed is not None:
        keep = keep & allowed
    return torch.where(keep, torch.relu(head_logits), torch.zeros((), dtype=head_logits.dtype, device=head_logits.device))


def accumulate_selection(scores: Tensor, carried: Tensor | None = None) -> Tensor:
    """The paper's F (b, n, m): for each query row the sum of `scores` (b, n, m) over the earlier
    rows of this call, plus `carried` (b, m), the sum over rows of earlier calls."""
    shifted = torch.cat([torch.zeros_like(scores[:, :1]), scores[:, :-1]], 1)  # row i holds S[i - 1]
    out = shifted.cumsum(1)
    return out if carried is None else out + carried[:, None, :]


class SelectiveKVCache(KVCache):
    """A layer's keys/values plus, per cached key (slot): `selected` (b, L) fp32, the sum of the
    selection scores S of all query rows seen so far (the F row of the next query); `cols`
    (b, L), the key's column in the model's position arrays (its place among all keys seen);
    `live` (b, L), False for the empty slots a compacted row leaves behind.

    The buffers start small and double when full (up to `max_len` keys), so the memory held
    follows the keys kept. prune_threshold: after each call, keys whose sum passes it (masked
    for every later query, F only growing) are dropped and the survivors moved to the front,
    so a pruned cache holds fewer keys than positions seen.
    """

    initial_capacity = 64

    def __init__(
        self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device | str | None = None, prune_threshold: float | None = None,
    ) -> None:
        capacity = min(max_len, self.initial_capacity)
        super().__init__(batch, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.limit = max_len
        acc = torch.promote_types(dtype, torch.float32)
        self.register_buffer("selected", torch.zeros(batch, capacity, dtype=acc, device=device), persistent=False)
        self.register_buffer("cols", torch.zeros(batch, capacity, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("live", torch.zeros(batch, capacity, dtype=torch.bool, device=device), persistent=False)
        self.prune_threshold = prune_threshold
        self.seen = 0  # keys appended, per row
        self.dropped = 0  # keys dropped by pruning, summed over rows
        self.peak_slots = 0  # the most slots ever in use

    @property
    def max_len(self) -> int:
        return self.limit

    @property
    def capacity(self) -> int:
        """Slots allocated now (grows by doubling; never above max_len)."""
        return self.k.shape[2]

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.selected, self.cols, self.live))

    def _grow(self, need: int) -> None:
        if need <= self.capacity or need > self.limit:
            return  # too many: KVCache.update raises with its message
        cap = min(self.limit, max(need, 2 * self.capacity))
        more = cap - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], more, self.k.shape[3])], 2)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], more, self.v.shape[3])], 2)
        for name in ("selected", "cols", "live"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(t.shape[0], more)], 1))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (b, g, n, d) keys/values after the used slots; return all used (b, g, S, d)."""
        self._grow(self.start + k.shape[2])
        out = super().update(k, v)
        self.seen += k.shape[2]
        self.peak_slots = max(self.peak_slots, self.start)
        return out

    def append_columns(self, cols: Tensor, live: Tensor | None = None) -> None:
        """Record the model columns (b, n) of the keys the last update appended, and which of
        them are real (False: padding, which no query will ever see)."""
        n = cols.shape[1]
        self.cols[:, self.start - n : self.start] = cols
        self.live[:, self.start - n : self.start] = True if live is None else live

    def compact(self) -> None:
        """Drop padding and the keys whose selection sum passes the threshold, and move the rest,
        in order, to the front of each row; rows keeping fewer keys than others end in dead
        slots. Nothing moves while the kept slots of every row are already in front."""
        used = self.start
        if self.prune_threshold is None or used == 0:
            return
        live = self.live[:, :used]
        keep = live & ~(self.selected[:, :used] > self.prune_threshold)
        self.dropped += int((live & ~keep).sum())
        if not bool((keep[:, 1:] & ~keep[:, :-1]).any()):  # no gap: only dead slots at the ends
            self.live[:, :used] = keep
            self.start = int(keep.sum(1).max())
            return
        order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)  # kept slots first, in order
        kept = int(keep.sum(1).max())
        idx = order[:, :kept]  # (b, kept)
        b, g, _, d = self.k.shape
        for buf in (self.k, self.v):
            buf[:, :, :kept] = buf[:, :, :used].gather(2, idx[:, None, :, None].expand(b, g, kept, d))
        for name in ("selected", "cols"):
            buf = getattr(self, name)
            buf[:, :kept] = buf[:, :used].gather(1, idx)
            buf[:, kept:used] = 0
        self.live[:, :kept] = keep.gather(1, idx)
        self.live[:, kept:used] = False
        self.start = kept

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (b',) of the batch, in that order (beam search)."""
        super().reorder(index)
        self.selected = self.selected.index_select(0, index)
        self.cols = self.cols.index_select(0, index)
        self.live = self.live.index_select(0, index)

    def pruned_fraction(self) -> float:
        """The fraction of the keys appended so far (all rows, padding included) that pruning
        dropped from the cache."""
        return self.dropped / (self.seen * self.batch) if self.seen else 0.0


class SelectiveAttention(MultiHeadAttention):
    """Multi-head attention whose logits are reduced by the selection mask F (see the module doc).

    Args (beyond MultiHeadAttention's):
        head: the query head whose logits give the selection score S.
        prune_threshold: mask keys whose F passes it (context pruning); None keeps every key.
    """

    def __init__(self, *, head: int, prune_threshold: float | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0 <= head < self.num_heads:
            raise ConfigError(f"selective attention: head {head} is not one of the {self.num_heads} heads (0 .. {self.num_heads - 1})")
        self.head = head
        self.prune_threshold = prune_threshold
        # the cache of the call in progress, for `modify_logits` (which gets no cache); else None
        self._cache: SelectiveKVCache | None = None

    def make_cache(self, spec: CacheSpec) -> nn.Module:
        """Keys, values and the running selection sums of this layer (no rolling window: evicting
        keys would change F's columns)."""
        if spec.window is not None:
            raise ValueError(
                "selective attention keeps a running selection sum per cached key and does not support a "
                f"rolling (window={spec.window}) cache; decode with a full cache (no window)"
            )
        return SelectiveKVCache(
            spec.batch, self.num_kv_heads, spec.max_len, self.head_dim, dtype=spec.dtype, device=spec.device,
            prune_threshold=self.prune_threshold,
        )

    def forward(self, x: Tensor, ctx: AttentionContext, *, memory: Tensor | None = None, cache: nn.Module | None = None) -> Tensor:
        """As MultiHeadAttention's. With a SelectiveKVCache the cached keys are the cache's slots
        (fewer than the positions once pruning has compacted it): the context's key positions,
        mask and bias are taken at the slots' columns, and after the call pruned keys leave."""
        if not isinstance(cache, SelectiveKVCache):
            return super().forward(x, ctx, memory=memory, cache=cache)  # type: ignore[arg-type]
        b, n = x.shape[:2]
        m = ctx.k_pos.shape[1]
        new_cols = torch.arange(m - n, m, device=x.device).expand(b, n)
        self._cache = cache
        try:
            if cache.prune_threshold is None:  # nothing ever leaves: slot j is column j
                return super().forward(x, ctx, memory=memory, cache=cache)
            out = super().forward(x, _at_slots(ctx, cache, new_cols), memory=memory, cache=cache)
        finally:
            self._cache = None
        # a key-padding mask (b, 1, 1, m) masks its keys for every later query: they can go
        pad = ctx.mask is not None and ctx.mask.dim() == 4 and ctx.mask.shape[1] == ctx.mask.shape[2] == 1
        cache.append_columns(new_cols, ctx.mask[:, 0, 0, m - n :].expand(b, n) if pad else None)  # type: ignore[index]
        cache.compact()
        return out

    def modify_logits(self, logits: Tensor, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor:
        """logits (b, h, n, m) minus F (b, 1, n, m); pruned keys set to -inf. With a cache, F
        starts from the cached sums and the sums are advanced past this call's rows."""
        if not ctx.causal:
            raise ValueError("selective attention is causal-only; it was called with a non-causal context")
        b, h, n, m = logits.shape
        allowed = full_mask(ctx.mask, True, n, m, logits.device)
        allowed = None if allowed is None else allowed.expand(b, h, n, m)[:, self.head]  # (b, n, m)
        scores = selection_scores(logits[:, self.head], allowed, ctx.k_pos)  # (b, n, m)
        carried = None if self._cache is None else self._cache.selected[:, :m].to(scores.dtype)
        acc = accumulate_selection(scores, carried)  # (b, n, m)
        if self._cache is not None:
            self._cache.selected[:, :m] = acc[:, -1] + scores[:, -1]
        out = logits - acc[:, None]
        if self.prune_threshold is not None:
            out = out.masked_fill(acc[:, None] > self.prune_threshold, float("-inf"))
        return out


def _at_slots(ctx: AttentionContext, cache: SelectiveKVCache, new_cols: Tensor) -> AttentionContext:
    """The context with keys in cache-slot order: the used slots, then the n new keys (columns
    `new_cols` (b, n)). Key positions, mask and bias are gathered at the slots' columns; dead
    slots are masked."""
    used = cache.start
    if used == ctx.k_pos.shape[1] - new_cols.shape[1] and bool(cache.live[:, :used].all()):
        return ctx  # nothing ever moved or left (any move leaves a dead slot): slot j is column j
    b, n = new_cols.shape
    cols = torch.cat([cache.cols[:, :used], new_cols], 1)  # (b, S)
    live = torch.cat([cache.live[:, :used], torch.ones_like(new_cols, dtype=torch.bool)], 1)  # (b, S)

    def at(t: Tensor) -> Tensor:  # (b|1, h|1, n|1, m) -> (b, h|1, n|1, S)
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        t = t.expand(b, *t.shape[1:])
        return t.gather(3, cols[:, None, None, :].expand(*t.shape[:3], cols.shape[1]))

    mask = live[:, None, None, :] if ctx.mask is None else at(ctx.mask) & live[:, None, None, :]
    return dataclasses.replace(
        ctx, k_pos=ctx.k_pos.gather(1, cols), mask=mask, bias=None if ctx.bias is None else at(ctx.bias),
        _logit_bias=None, _logit_bias_ready=False,
    )


@dataclass
class SelectiveOptions:
    """Options of attention kind 'selective'.

    head: the query head whose logits give the selection score (the paper uses head 0);
    prune_threshold: context pruning, masking every key whose accumulated score F passes this
    (> 0) value for all later queries; None (default) prunes nothing.
    """

    head: int = 0
    prune_threshold: float | None = None


@ATTENTIONS.register("selective")
def build_selective(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Selective attention (Leviathan et al. 2024) for causal self-attention stacks."""
    where = "model.attention.options (selective)"
    opts = parse_options(SelectiveOptions, cfg.options, where)
    if not ctx.causal or ctx.cross:
        raise ConfigError(
            f"selective attention is causal-only; the '{ctx.stack}' stack is "
            f"{'cross-attention' if ctx.cross else 'not causal'}. Use it in decoder-only models (arch 'decoder') "
            "or pick another model.attention.kind"
        )
    if not 0 <= opts.head < cfg.num_heads:
        raise ConfigError(
            f"{where}: head is {opts.head}; it must name one of the {cfg.num_heads} heads, 0 .. {cfg.num_heads - 1}"
        )
    if opts.prune_threshold is not None and not opts.prune_threshold > 0:
        raise ConfigError(f"{where}: prune_threshold is {opts.prune_threshold}; it must be > 0, or null to prune nothing")
    return mha_from_config(cfg, ctx, cls=SelectiveAttention, head=opts.head, prune_threshold=opts.prune_threshold)


build_selective.causal_only = True  # type: ignore[attr-defined]  # refuses non-causal stacks
