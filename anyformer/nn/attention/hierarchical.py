"""Hierarchical attention (H-Transformer-1D, Zhu & Soricut 2021): exact attention between
neighbouring blocks, coarsened attention between far ones, O(n) memory.

The sequence is cut into blocks of `r` tokens and padded to L = r * 2^T tokens (padding is
never attended). Block pairs form a binary tree: two different blocks I and J are first
separated at level l = the highest bit in which I and J differ, where they are siblings (the
two halves of one block of r * 2^(l+1) tokens). At level l, queries and keys are coarsened by
averaging 2^l neighbours (values too), and each block of r coarse queries attends to the r
coarse keys of its sibling; at level 0 that is exact, and every block also attends to itself.
Each (query, key) pair is thus scored once, at the level that separates them, with

    logit(i, j) = qbar_l(i) . kbar_l(j) * scale        (l = the level of the pair)

and one softmax over all of a query's logits: a coarse key stands for the 2^l keys it averages
(its weight counts them; masked keys count zero). This is exactly softmax attention with that
logit matrix, which `dense_hierarchical_weights` builds for inspection and tests.

With a causal mask, a query sees its own block up to itself and, at each level, the left
sibling of its ancestor when that ancestor is a right child. Queries are never coarsened there
(a block mean of queries would mix later tokens into earlier outputs), so a query scores r
keys per level and the time is O(n r log(n / r)); memory stays O(n r log(n / r)) as well.
Without a mask, coarse queries make both O(n r).

`levels` caps the hierarchy: pairs separated above level `levels - 1` are not attended. The
`h-transformer-1d` package's non-causal layer stops one level short of the full tree (its
largest blocks never see the other half of the sequence); `levels = T - 1` reproduces it.

Legend: `b` batch, `h` heads, `n` queries, `m` keys, `d` head dim, `r` block size, `L`
padded length, `N` tokens at a level (L / 2^l), `c` blocks at a level, `p` sibling pairs,
`B` fine tokens per block at a level (r * 2^l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..kv_cache import CacheSpec
from ..positional.base import POSITIONALS, PositionalEncoding
from .context import AttentionContext
from .kernels import repeat_kv
from .mha import MultiHeadAttention, mha_from_config
from .registry import ATTENTIONS

_NEG = float("-inf")


def num_levels(length: int, block: int) -> int:
    """T: the levels a sequence of `length` tokens needs so that every pair of its
    blocks of `block` tokens is separated at some level (0 when it fits one block)."""
    return (max(1, -(-length // block)) - 1).bit_length()


def _wide(t: Tensor) -> Tensor:
    """Logits and sums in fp32 at least (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _log_counts(counts: Tensor) -> Tensor:
    """log of how many keys a coarse key stands for; -inf where it stands for none."""
    return torch.where(counts > 0, counts.clamp_min(1).log(), torch.full_like(counts, _NEG))


def _safe(m: Tensor) -> Tensor:
    """A row maximum usable as a softmax shift: 0 where the row has no key at all."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _weighted(S: Tensor, shift: Tensor, values: Tensor, dropout: float) -> tuple[Tensor, Tensor]:
    """exp(S - shift) times values (b, h, ..., k, d) and the row sums of the weights: the
    unnormalised output (fp32) and its normaliser. Dropout drops weights of the output only,
    which is dropout on the normalised probabilities."""
    e = torch.exp(S - shift[..., None])  # (..., rows, keys), fp32 or wider
    a = e.sum(-1)
    if dropout > 0:
        e = F.dropout(e, dropout)
    return _wide(e.to(values.dtype) @ values), a


def _sibling(t: Tensor) -> Tensor:
    """Blocks (dim 2, an even count) swapped in pairs, 2p <-> 2p + 1: each block's sibling."""
    shape = t.shape
    return t.reshape(*shape[:2], shape[2] // 2, 2, *shape[3:]).flip(3).reshape(shape)


def _pairs_max(S: Tensor) -> Tensor:
    """Row maxima of logits, outside autograd (a softmax shift cancels in the gradient)."""
    with torch.no_grad():
        return S.amax(-1)


# --------------------------------------------------------------------------- without a mask


def hierarchical_attention(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, levels: int | None = None, keep: Tensor | None = None,
    scale: float | None = None, dropout: float = 0.0,
) -> Tensor:
    """Non-causal hierarchical attention of one sequence over itself. q, k, v: (b, h, n, d);
    keep: (b, n) bool, False = a padding key (and a query left out of coarse query means);
    levels: at most this many levels (None: all). Returns (b, h, n, d)."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    T = num_levels(n, block)
    top = T if levels is None else min(T, levels)
    if T == 0:  # one block: exact attention
        S = _wide(q @ k.transpose(-1, -2)) * scale  # (b, h, n, n)
        if keep is not None:
            S = S.masked_fill(~keep[:, None, None, :], _NEG)
        y, a = _weighted(S, _safe(_pairs_max(S)), v, dropout)
        return (y / a.clamp_min(1e-30)[..., None]).to(v.dtype)
    if top < 1:
        raise ValueError(f"hierarchical_attention needs levels >= 1, got {levels}")
    L = block << T
    pad = L - n
    w = None  # (b, 1, L, 1) weights of the fine tokens: 1 real, 0 padding or masked
    if keep is not None or pad:
        w = q.new_ones(b, 1, n, 1, dtype=_wide(q[:0]).dtype) if keep is None else keep[:, None, :, None].to(_wide(q[:0]).dtype)
        w = F.pad(w, (0, 0, 0, pad))
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q = q * scale
    if w is not None:  # masked tokens leave the sums (padded ones are zero already)
        q, k, v = (t * w.to(t.dtype) for t in (q, k, v))
    sums, counts = (q, k, v), w  # sums over each group of 2^l fine tokens, and how many are real
    parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (y, a, shift) per level, at its resolution
    for level in range(top):
        if level:
            sums = tuple(t.view(b, h, t.shape[2] // 2, 2, d).sum(3) for t in sums)  # (b, h, N, d)
            if counts is not None:
                counts = counts.view(b, 1, counts.shape[2] // 2, 2, 1).sum(3)  # (b, 1, N, 1)
        N = L >> level
        c = N // block
        if counts is None:  # every coarse token stands for 2^l keys
            qm, km, vm = (t / float(1 << level) for t in sums)
            logc: Tensor | float = level * math.log(2.0)
        else:
            qm, km, vm = (t / counts.clamp_min(1).to(t.dtype) for t in sums)
            logc = _log_counts(counts.view(b, 1, c, 1, block))  # (b, 1, c, 1, r)
        qb, kd, vd = (t.view(b, h, c, block, d) for t in (qm, km, vm))
        kb, vb, logs = _sibling(kd), _sibling(vd), logc if isinstance(logc, float) else _sibling(logc)
        S = _wide(qb @ kb.transpose(-1, -2)) + logs  # (b, h, c, r, r)
        values = vb
        if level == 0:  # the diagonal blocks, exact, beside the siblings
            Sd = _wide(qb @ kd.transpose(-1, -2)) + logc
            S, values = torch.cat([Sd, S], -1), torch.cat([vd, vb], -2)  # (b, h, c, r, 2r), (b, h, c, 2r, d)
        shift = _safe(_pairs_max(S))  # (b, h, c, r)
        y, a = _weighted(S, shift, values, dropout)
        parts.append((y.view(b, h, N, d), a.view(b, h, N), shift.view(b, h, N)))
    y, a, s = parts[-1]
    for yl, al, sl in reversed(parts[:-1]):  # interpolate coarse to fine, one level at a time
        y, a, s = (t.repeat_interleave(2, dim=2) for t in (y, a, s))
        top_s = torch.maximum(s, sl)
        f1, f2 = torch.exp(s - top_s), torch.exp(sl - top_s)
        y, a, s = y * f1[..., None] + yl * f2[..., None], a * f1 + al * f2, top_s
    out = y / a.clamp_min(1e-30)[..., None]
    return out[:, :, :n].to(v.dtype)


# --------------------------------------------------------------------------- causal


def causal_hierarchical_attention(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, levels: int | None = None, keep: Tensor | None = None,
    scale: float | None = None, dropout: float = 0.0,
) -> Tensor:
    """Causal hierarchical attention, q, k, v (b, h, n, d) of one sequence (query i is key i);
    keep (b, n) bool masks keys. Returns (b, h, n, d)."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    T = num_levels(n, block)
    top = T if levels is None else min(T, levels)
    L = block << T
    c = L // block
    pad = L - n
    if pad:  # padded keys come after every real query: causality already hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q = q * scale
    w = None if keep is None else F.pad(keep[:, None, :, None].to(_wide(q[:0]).dtype), (0, 0, 0, pad))  # (b, 1, L, 1)
    # the diagonal blocks, exact and causal
    qb = q.view(b, h, c, block, d)
    Sd = (qb @ k.view(b, h, c, block, d).transpose(-1, -2))  # (b, h, c, r, r)
    tril = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    Sd = Sd.masked_fill(~tril, _NEG)
    if w is not None:
        Sd = Sd + _log_counts(w.view(b, 1, c, block))[:, :, :, None, :]
    # each level: the right children's fine queries against their left siblings' coarse keys
    ks, vs = (k, v) if w is None else (k * w.to(k.dtype), v * w.to(v.dtype))
    counts = w
    scores: list[tuple[Tensor, Tensor]] = []  # (S (b, h, p, B, r), coarse values (b, h, p, r, d))
    for level in range(top):
        if level:
            ks, vs = (t.view(b, h, t.shape[2] // 2, 2, d).sum(3) for t in (ks, vs))  # (b, h, N, d)
            if counts is not None:
                counts = counts.view(b, 1, counts.shape[2] // 2, 2, 1).sum(3)
        B = block << level
        p = L // B // 2
        left = lambda t: t.reshape(t.shape[0], t.shape[1], p, 2, block, t.shape[-1])[:, :, :, 0]  # noqa: E731  # (., ., p, r, .)
        if counts is None:
            km, vm = left(ks) / 2**level, left(vs) / 2**level
            bias = level * math.log(2.0)
        else:
            cl = left(counts).clamp_min(1)
            km, vm = left(ks) / cl.to(ks.dtype), left(vs) / cl.to(vs.dtype)
            bias = _log_counts(left(counts)[..., 0])[:, :, :, None, :]  # (b, 1, p, 1, r)
        qr = q.view(b, h, p, 2, B, d)[:, :, :, 1]  # (b, h, p, B, d)
        S = _wide(qr @ km.transpose(-1, -2)) + bias  # (b, h, p, B, r)
        scores.append((S, vm))
    # one softmax over all of a query's logits: the shift is the largest of them
    with torch.no_grad():
        M = Sd.amax(-1).reshape(b, h, L)
        for level, (S, _) in enumerate(scores):
            B = block << level
            view = M.view(b, h, L // B // 2, 2, B)[:, :, :, 1]
            view.copy_(torch.maximum(view, S.amax(-1)))
        M = _safe(M)
    y, a = _weighted(Sd, M.view(b, h, c, block), v.view(b, h, c, block, d), dropout)
    y, a = y.view(b, h, L, d), a.view(b, h, L)
    for level, (S, vm) in enumerate(scores):
        B = block << level
        p = L // B // 2
        yl, al = _weighted(S, M.view(b, h, p, 2, B)[:, :, :, 1], vm, dropout)
        y = y.view(b, h, p, 2, B, d)
        y = torch.stack([y[:, :, :, 0], y[:, :, :, 1] + yl], 3).view(b, h, L, d)
        a = a.view(b, h, p, 2, B)
        a = torch.stack([a[:, :, :, 0], a[:, :, :, 1] + al], 3).view(b, h, L)
    out = y / a.clamp_min(1e-30)[..., None]
    return out[:, :, :n].to(v.dtype)


def causal_hierarchical_rows(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, levels: int | None = None, keep: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """The rows of `causal_hierarchical_attention` for the last n of m positions (decoding with
    a cache): q (b, h, n, d), k, v (b, h, m, d), keep (b, m). Each query reads its own block
    and one pooled block of keys per level: O(m d) per query, like exact attention, but it
    scores at most r (T + 1) keys."""
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    wide = _wide(q[:0]).dtype
    outs = []
    for t in range(n):
        i = m - n + t  # this query's index among the keys
        lo = i // block * block
        keys, values = [k[:, :, lo : i + 1]], [v[:, :, lo : i + 1]]
        own = torch.ones(b, 1, i + 1 - lo, device=q.device, dtype=wide) if keep is None else keep[:, None, lo : i + 1].to(wide)
        biases = [_log_counts(own)]  # (b, 1, j) per group of keys
        top = num_levels(i + 1, block) if levels is None else min(num_levels(i + 1, block), levels)
        for level in range(top):
            B = block << level
            I = i // B
            if not I & 1:
                continue
            sl = slice((I - 1) * B, I * B)
            ks, vs = k[:, :, sl].reshape(b, h, block, 1 << level, d), v[:, :, sl].reshape(b, h, block, 1 << level, d)
            if keep is None:
                keys.append(ks.mean(3))
                values.append(vs.mean(3))
                biases.append(torch.full((b, 1, block), level * math.log(2.0), device=q.device, dtype=wide))
            else:
                wl = keep[:, None, sl].reshape(b, 1, block, 1 << level, 1).to(wide)
                cnt = wl.sum(3)  # (b, 1, r, 1)
                keys.append((ks * wl.to(ks.dtype)).sum(3) / cnt.clamp_min(1).to(ks.dtype))
                values.append((vs * wl.to(vs.dtype)).sum(3) / cnt.clamp_min(1).to(vs.dtype))
                biases.append(_log_counts(cnt[..., 0]))
        K, V = torch.cat(keys, 2), torch.cat(values, 2)  # (b, h, j, d)
        S = _wide(q[:, :, t : t + 1] * scale @ K.transpose(-1, -2))  # (b, h, 1, j)
        S = S + torch.cat(biases, -1)[:, :, None]
        y, a = _weighted(S, _safe(_pairs_max(S)), V, 0.0)
        outs.append((y / a.clamp_min(1e-30)[..., None]).to(v.dtype))
    return torch.cat(outs, 2)


# --------------------------------------------------------------------------- the dense form


def _coarse(x: Tensor, w: Tensor | None, level: int) -> Tensor:
    """Each token replaced by the (masked) mean over its group of 2^level: (b, h, L, d)."""
    b, h, L, d = x.shape
    g = 1 << level
    if w is None:
        return x.view(b, h, L // g, g, d).mean(3).repeat_interleave(g, 2)
    ww = w.view(b, 1, L // g, g, 1)
    mean = (x.view(b, h, L // g, g, d) * ww).sum(3) / ww.sum(3).clamp_min(1)
    return mean.repeat_interleave(g, 2)


def dense_hierarchical_weights(
    q: Tensor, k: Tensor, *, block: int, causal: bool, levels: int | None = None, keep: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """The (b, h, n, m) probabilities hierarchical attention applies, as one dense matrix:
    softmax over the logit of each (query, key) pair at the level that separates them (the
    queries are the last n of m positions). O(m^2): for `inspect attention` and tests."""
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    T = num_levels(m, block)
    L = block << T
    if not causal and n != m:
        raise ValueError("non-causal hierarchical attention needs as many queries as keys")
    qf = F.pad(_wide(q), (0, 0, m - n, L - m))  # (b, h, L, d): query rows at their key indices
    kf = F.pad(_wide(k), (0, 0, 0, L - m))
    w = F.pad(torch.ones(b, 1, m, 1, device=q.device) if keep is None else keep[:, None, :, None].float(), (0, 0, 0, L - m))
    blocks = torch.arange(L, device=q.device) // block
    diff = blocks[:, None] ^ blocks[None, :]
    level_of = torch.where(diff == 0, torch.zeros_like(diff), torch.floor(torch.log2(diff.clamp_min(1).float())).long())  # (L, L)
    logits = torch.full((b, h, L, L), _NEG, device=q.device, dtype=qf.dtype)
    top = T if levels is None else min(T, levels)
    for level in range(max(top, 1)):
        qq = qf if causal else _coarse(qf, w, level)
        S = (qq @ _coarse(kf, w, level).transpose(-1, -2)) * scale
        logits = torch.where(level_of == level, S, logits)
    idx = torch.arange(L, device=q.device)
    allowed = (w[:, :, None, :, 0] > 0) & (level_of < max(top, 1))
    if causal:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    logits = logits.masked_fill(~allowed, _NEG)
    rows = slice(m - n, m) if causal else slice(0, n)
    probs = torch.softmax(logits[:, :, rows, :m], -1)
    return probs.nan_to_num(0.0)


# --------------------------------------------------------------------------- the layer


def _keep_of(mask: Tensor | None, b: int, m: int) -> Tensor | None:
    """A key-padding mask (broadcastable to (b, 1, 1, m)) as (b, m) keep flags; any other mask
    cannot be expressed on coarsened keys and is refused."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            f"hierarchical attention takes a key-padding mask only (keep flags per key, shape (b, 1, 1, m)); got a "
            f"{mask.dtype} mask of shape {tuple(mask.shape)}. Packed documents, prefix masks and graph masks need an "
            "attention kind that scores every (query, key) pair, such as 'mha'"
        )
    return mask[:, 0, 0, :].expand(b, m)


DECODING_ROWS = 4  # up to this many new queries after a cache are computed row by row, more as the whole sequence


class HierarchicalKernel:
    """A kernel with the exact kernels' signature (q (b, h, n, d), k/v (b, g, m, d) -> out)
    that computes hierarchical attention: the whole sequence at once, or, with a cache, the
    rows of its last n queries."""

    approximates_softmax = True  # benchmarks print its error against exact attention

    def __init__(self, block: int, levels: int | None) -> None:
        self.block, self.levels = block, levels

    def keys_per_query(self, n: int, m: int, causal: bool) -> float:
        """The mean number of (coarse or fine) keys a query is scored against, padding and the
        causal mask's hidden half of the diagonal blocks included, as computed."""
        r = self.block
        if n < m and n > DECODING_ROWS:  # a long chunk after a cache: the whole sequence's rows are computed
            return self.keys_per_query(m, m, causal) * m / n
        if n < m:  # decoding rows: each query's own block up to itself, r pooled keys per level where it is a right child
            total = 0
            for i in range(m - n, m):
                blocks = i // r
                top = blocks.bit_length() if self.levels is None else min(blocks.bit_length(), self.levels)
                total += i % r + 1 + r * bin(blocks & ((1 << top) - 1)).count("1")
            return total / n
        T = num_levels(n, r)
        if T == 0:
            return float(n)
        top = T if self.levels is None else min(T, self.levels)
        padded = (r << T) / n
        if causal:  # the diagonal blocks in full, then half of the queries against r keys per level
            return padded * (r + r * top / 2)
        return padded * (2 * r + sum(r / 2**level for level in range(1, top)))

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None, causal: bool = False,
        scale: float | None = None, dropout: float = 0.0, **_: object,
    ) -> Tensor:
        if bias is not None:
            raise ValueError(
                "hierarchical attention cannot add a bias to every (query, key) logit: far keys are scored as block means. "
                "Use a positional kind that acts on the input or on q/k (none, learned, sinusoidal, rope) and a boolean "
                "key-padding mask instead of an additive one"
            )
        b, h, n, _d = q.shape
        m = k.shape[2]
        keep = _keep_of(mask, b, m)
        k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
        opts = dict(block=self.block, levels=self.levels, keep=keep, scale=scale)
        if not causal:
            if n != m:
                raise ValueError(f"non-causal hierarchical attention scores one sequence against itself; got {n} queries over "
                                 f"{m} keys (a cache or cross-attention). Use it in an encoder's self-attention")
            return hierarchical_attention(q, k, v, dropout=dropout, **opts)  # type: ignore[arg-type]
        if n == m:
            return causal_hierarchical_attention(q, k, v, dropout=dropout, **opts)  # type: ignore[arg-type]
        if n <= DECODING_ROWS:  # decoding steps: one pooled block per level and query
            return causal_hierarchical_rows(q, k, v, **opts)  # type: ignore[arg-type]
        # a long chunk after a cache: the whole sequence's rows (queries only change their own rows)
        front = q.new_zeros(b, h, m - n, q.shape[3])
        return causal_hierarchical_attention(torch.cat([front, q], 2), k, v, dropout=dropout, **opts)[:, :, m - n :]  # type: ignore[arg-type]


class HierarchicalAttention(MultiHeadAttention):
    """Multi-head attention whose kernel is hierarchical; the probabilities it hands to
    `inspect attention` (and to the explicit path) are the dense form of the same weights, so
    collecting them changes nothing."""

    def make_cache(self, spec: CacheSpec) -> nn.Module:
        if spec.window is not None:
            raise ValueError(
                "hierarchical attention places its blocks by token index, which a rolling (sink + window) cache reassigns; "
                "decode with a full cache (drop `window`)"
            )
        return super().make_cache(spec)

    def probabilities(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor:
        kernel: HierarchicalKernel = self.kernel  # type: ignore[assignment]
        b, h = q.shape[:2]
        keep = _keep_of(ctx.mask, b, k.shape[2])
        k = repeat_kv(k, h // k.shape[1])
        return dense_hierarchical_weights(q, k, block=kernel.block, causal=ctx.causal, levels=kernel.levels, keep=keep, scale=self.scale)


@dataclass
class HierarchicalOptions:
    """`block_size`: r, the tokens of a block (exact attention within a block and with its
    sibling); `levels`: at most this many levels of the hierarchy (unset: as many as the length
    needs, so every query sees every earlier or every other key)."""

    block_size: int = 16
    levels: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"model.attention.options.block_size must be >= 1, got {self.block_size}")
        if self.levels is not None and self.levels < 1:
            raise ConfigError(f"model.attention.options.levels must be >= 1 (or unset for all), got {self.levels}")


@ATTENTIONS.register("hierarchical")
def build_hierarchical(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """H-Transformer-1D hierarchical attention (Zhu & Soricut 2021), causal and not."""
    opts = parse_options(HierarchicalOptions, cfg.options, "model.attention.options (hierarchical)")
    if ctx.cross:
        raise ConfigError("attention kind 'hierarchical' builds its hierarchy over one sequence's own tokens; it cannot be "
                          "cross-attention. Use an attention kind such as 'mha' there")
    positional = ctx.model.positional.kind
    pos_cls = POSITIONALS.get(positional)
    if any(getattr(pos_cls, name) is not getattr(PositionalEncoding, name) for name in ("bias", "query_bias", "value_term")):
        raise ConfigError(f"positional kind '{positional}' adds a term to every (query, key) pair, which attention kind "
                          "'hierarchical' cannot take (far keys are scored as block means). Use rope, learned, sinusoidal "
                          "or none")
    return mha_from_config(cfg, ctx, kernel=HierarchicalKernel(opts.block_size, opts.levels), cls=HierarchicalAttention)


build_hierarchical.position_dependent = True  # type: ignore[attr-defined]  # blocks follow token indices
