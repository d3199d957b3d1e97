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
masked for that query and, F only growing down the rows, for every later one, so it could be
dropped from the cache. The mask is applied in every call (training included), which keeps a
cached run equal to a full one; memory is not freed here (no compaction), but
`SelectiveKVCache.pruned_fraction()` reports how much could be.
"""

from __future__ import annotations

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
    """A layer's keys/values plus `selected` (b, L) fp32: for each cached key, the sum of the
    selection scores S of all query rows seen so far (the F row of the next query).

    prune_threshold: keys whose sum passes it are pruned (masked for every later query).
    """

    def __init__(
        self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device | str | None = None, prune_threshold: float | None = None,
    ) -> None:
        super().__init__(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        acc = torch.promote_types(dtype, torch.float32)
        self.register_buffer("selected", torch.zeros(batch, max_len, dtype=acc, device=device), persistent=False)
        self.prune_threshold = prune_threshold

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (b',) of the batch, in that order (beam search)."""
        super().reorder(index)
        self.selected = self.selected.index_select(0, index)

    def pruned(self) -> Tensor:
        """(b, start) bool: cached keys pruned for every query from now on (all False without a
        threshold)."""
        f = self.selected[:, : self.start]
        if self.prune_threshold is None:
            return torch.zeros_like(f, dtype=torch.bool)
        return f > self.prune_threshold

    def pruned_fraction(self) -> float:
        """The fraction of cached key slots (padding included) that context pruning has dropped."""
        return float(self.pruned().float().mean()) if self.start else 0.0


class SelectiveAttention(MultiHeadAttention):
    """Multi-head attention whose logits are reduced by the selection mask F (see the module doc).

    Args (beyond MultiHeadAttention's):
        head: the query head whose logits give the selection score S.
        prune_threshold: mask keys whose F passes it (context pruning); None keeps every key.
    """

    def __init__(self, *, head: int = 0, prune_threshold: float | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0 <= head < self.num_heads:
            raise ConfigError(f"selective attention: head {head} is not one of the {self.num_heads} heads (0 .. {self.num_heads - 1})")
        self.head = head
        self.prune_threshold = prune_threshold
        # the cache's running sums (b, L) during a call with a cache; None otherwise (see forward)
        self._carried: Tensor | None = None

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
        """As MultiHeadAttention's; a SelectiveKVCache's running sums are made visible to
        `modify_logits` (which gets no cache) for the duration of this call."""
        self._carried = None if cache is None else cache.selected  # type: ignore[union-attr]
        try:
            return super().forward(x, ctx, memory=memory, cache=cache)  # type: ignore[arg-type]
        finally:
            self._carried = None

    def modify_logits(self, logits: Tensor, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor:
        """logits (b, h, n, m) minus F (b, 1, n, m); pruned keys set to -inf. With a cache, F
        starts from the cached sums and the sums are advanced past this call's rows."""
        if not ctx.causal:
            raise ValueError("selective attention is causal-only; it was called with a non-causal context")
        b, h, n, m = logits.shape
        allowed = full_mask(ctx.mask, True, n, m, logits.device)
        allowed = None if allowed is None else allowed.expand(b, h, n, m)[:, self.head]  # (b, n, m)
        scores = selection_scores(logits[:, self.head], allowed, ctx.k_pos)  # (b, n, m)
        carried = None if self._carried is None else self._carried[:, :m].to(scores.dtype)
        acc = accumulate_selection(scores, carried)  # (b, n, m)
        if self._carried is not None:
            self._carried[:, :m] = acc[:, -1] + scores[:, -1]
        out = logits - acc[:, None]
        if self.prune_threshold is not None:
            out = out.masked_fill(acc[:, None] > self.prune_threshold, float("-inf"))
        return out


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
