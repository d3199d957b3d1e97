"""HyperAttention (Han et al. 2023, "HyperAttention: Long-context Attention in Near-Linear Time").

Large entries of the attention matrix are found with sorted locality-sensitive hashing:
queries and keys are sorted by an angular-LSH bucket (Gray-code order, so neighbouring buckets
differ in one hyperplane) and attended block-diagonally in that order. The rest of each row is
estimated from uniformly sampled key columns (scaled by m / s, with keys of the query's own
block masked so nothing is counted twice). The two partial softmaxes are merged through their
log-sum-exps, which gives the correctly normalised result. The causal variant recurses: the
two diagonal halves are causal problems, the lower-left block is a non-causal one. At or below
`min_seq_len` keys, the configured exact kernel runs instead (exactly equal to 'mha').

As in the paper, a query's block in an off-diagonal part is chosen by its rank among that
part's queries, so in the causal variant the *choice* of which earlier keys a query sees can
depend on later queries' hashes (its weights never cover later keys).

Legend: `b` batch, `h` heads, `n` queries, `m` keys, `d` head dim, `e` value dim, `B` blocks,
`Q`/`K` query/key block sizes, `s` sampled columns, `r` hash bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from .kernels import Kernel, repeat_kv
from .masks import causal_mask
from .mha import head_dim_of, mha_from_config
from .registry import ATTENTIONS, KERNELS


class AngularLSH(nn.Module):
    """Sign-of-random-projection hashing of head vectors into 2^r buckets, numbered so that
    buckets next to each other in the order differ in a single hyperplane (Gray code)."""

    def __init__(self, head_dim: int, num_bits: int) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(head_dim, num_bits))  # (d, r)
        codes = torch.arange(2**num_bits)
        rank = torch.empty_like(codes)
        rank[codes ^ (codes >> 1)] = codes  # Gray code g(i) = i ^ (i >> 1) sits at rank i
        self.register_buffer("rank", rank, persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(num_bits), persistent=False)
        self.num_buckets = 2**num_bits

    def forward(self, x: Tensor) -> Tensor:
        """x (..., n, d) -> bucket ranks (..., n), int64 in [0, num_buckets)."""
        bits = (x.float() @ self.projection.float() > 0).long()  # (b, h, n, r)
        return self.rank[(bits * self.powers).sum(-1)]


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Exact softmax attention that also returns each row's log-sum-exp, in fp32.

    q (..., n, d), k/v (..., m, d|e), bias broadcastable to (..., n, m) (-inf = masked).
    Returns out (..., n, e) and lse (..., n, 1); a row with no key gives out 0, lse -inf.
    """
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (..., n, m)
    if bias is not None:
        logits = logits + bias
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    # written out instead of logsumexp/nan_to_num so that rows with no key stay finite in the
    # backward pass too (exp(-inf - -inf) there would turn zero gradients into NaN)
    shift = _finite_or_zero(logits.amax(-1, keepdim=True).detach())  # result is invariant to it
    e = (logits - shift).exp()  # masked entries: exp(-inf) = 0
    total = e.sum(-1, keepdim=True)
    return (e / _positive_or_one(total)) @ v.float(), _lse(shift, total)


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _positive_or_one(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _lse(shift: Tensor, total: Tensor) -> Tensor:
    """shift + log(total), and -inf where total is 0, with finite gradients everywhere."""
    return torch.where(total > 0, shift + _positive_or_one(total).log(), torch.full_like(total, float("-inf")))


def _merge_weights(lse1: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The weights of two softmax attentions over disjoint key sets in the one over their
    union, and its log-sum-exp (rows empty in both: weights 0, lse -inf, finite gradients)."""
    shift = _finite_or_zero(torch.maximum(lse1, lse2).detach())
    e1, e2 = (lse1 - shift).exp(), (lse2 - shift).exp()
    total = e1 + e2
    safe = _positive_or_one(total)
    return e1 / safe, e2 / safe, _lse(shift, total)


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax attentions over disjoint key sets into the one over their union."""
    w1, w2, lse = _merge_weights(lse1, lse2)
    return o1 * w1 + o2 * w2, lse


def _merge_into(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> None:
    """merge_attention written into o1 and lse1 in place (no gradient), without temporaries
    the size of the outputs."""
    w1, w2, lse = _merge_weights(lse1, lse2)
    o1.mul_(w1).addcmul_(o2, w2)
    lse1.copy_(lse)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (..., n, c) rows picked by idx (..., k) -> (..., k, c). Advanced indexing copies whole
    rows, several times faster than `gather` with an index expanded over c."""
    lead = idx.shape[:-1]
    ranges = [torch.arange(s, device=idx.device).view(*([1] * i), s, *([1] * (len(lead) - i))) for i, s in enumerate(lead)]
    return x[(*ranges, idx)]


def _inverse(order: Tensor) -> Tensor:
    """The inverse of permutations along the last dim: where each element sits after sorting."""
    inv = torch.empty_like(order)
    return inv.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def _fused(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether PyTorch's fused CPU attention (which also returns log-sum-exps) can run: on CPU,
    and only when no gradient is needed (its log-sum-exp output has no backward)."""
    return q.device.type == "cpu" and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention with each row's log-sum-exp, for 4-D q (G, H, n, d), k/v (G, H, m, d|e)
    (strided views welcome) and an additive bias broadcastable to (G, H, n, m) whose -inf
    entries mask keys. Returns out (G, H, n, e) fp32 and lse (G, H, n, 1); rows with no visible
    key give 0 and -inf. The fused kernel runs where it can; otherwise the explicit fp32 form."""
    if not _fused(q, k, v):
        return attention_with_lse(q, k, v, scale=scale, bias=bias, causal=causal)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    lse = lse[..., None]
    if bias is not None:  # the fused kernel reports 0 (not -inf) for rows it found no key in
        masked = bias == float("-inf")  # broadcastable to (G, H, n, m)
        if causal:  # query i of n sees keys up to i + m - n: dead if all of those are masked
            p = k.shape[-2] - q.shape[-2]
            dead = masked.expand(*masked.shape[:-2], 1, masked.shape[-1]).int().cumprod(-1).bool()[..., p:].transpose(-1, -2)
        else:
            dead = masked.all(-1, keepdim=True)
        lse = lse.masked_fill(dead, float("-inf"))
    return out.float(), lse


def hyper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    lsh: AngularLSH,
    block_size: int,
    sample_size: int,
    key_bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    ranks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Non-causal HyperAttention: sorted-LSH block-diagonal part plus sampled columns.

    q (..., n, d), k/v (..., m, d|e) with any leading dims (each slice is its own problem),
    key_bias broadcastable to (..., m): additive per key (-inf = padding); query_valid
    broadcastable to (..., n): False for padding queries, which are sorted last so that they
    never take a real query's place in a block; ranks: the LSH buckets (..., n) and (..., m) of
    q and k when already computed. Returns out (..., n, e) fp32 and lse (..., n, 1).

    Each block's queries attend, in one softmax, to the block's keys and to the sampled keys
    (logits shifted by log(m / s); a sampled key that lies in the block itself is masked).
    """
    *lead, n, d = q.shape
    m, e = k.shape[-2], v.shape[-1]
    key_bias = q.new_zeros(m, dtype=torch.float32) if key_bias is None else key_bias.float()
    key_bias = key_bias.expand(*lead, m)
    num_blocks = math.ceil(m / block_size)
    qb = math.ceil(n / num_blocks)
    q_rank, k_rank = (lsh(q), lsh(k)) if ranks is None else ranks  # (..., n), (..., m)
    if query_valid is not None:
        q_rank = q_rank.masked_fill(~query_valid, lsh.num_buckets)
    k_rank = k_rank.masked_fill(key_bias == float("-inf"), lsh.num_buckets)  # masked keys last
    q_order = q_rank.argsort(dim=-1, stable=True)  # (..., n)
    k_order = k_rank.argsort(dim=-1, stable=True)  # (..., m)
    # one gather each builds the blocked layout; padded places take row 0, and their keys are
    # masked and their queries dropped
    q_idx = F.pad(q_order, (0, num_blocks * qb - n))  # (..., B * Q)
    k_idx = F.pad(k_order, (0, num_blocks * block_size - m)).unflatten(-1, (num_blocks, block_size))  # (..., B, K)
    bs = F.pad(key_bias.gather(-1, k_order), (0, num_blocks * block_size - m), value=float("-inf"))
    bs = bs.unflatten(-1, (num_blocks, block_size))  # (..., B, K)
    if num_blocks > 1 and sample_size > 0:
        idx = torch.randint(0, m, (*lead, sample_size), device=q.device)  # (..., s), with replacement
        in_block = _inverse(k_order).gather(-1, idx) // block_size  # (..., s): block of each sampled key
        same = in_block[..., None, :] == torch.arange(num_blocks, device=q.device)[:, None]  # (..., B, s)
        bias_s = (key_bias.gather(-1, idx) + math.log(m / sample_size))[..., None, :].masked_fill(same, float("-inf"))
        k_idx = torch.cat([k_idx, idx[..., None, :].expand(*lead, num_blocks, sample_size)], dim=-1)  # (..., B, K + s)
        bs = torch.cat([bs, bias_s], dim=-1)
    width = k_idx.shape[-1]
    G = math.prod(lead)
    qs = _gather(q, q_idx).view(G, num_blocks, qb, d)  # (G, B, Q, d)
    ks = _gather(k, k_idx.flatten(-2)).view(G, num_blocks, width, d)  # (G, B, K + s, d)
    vs = _gather(v, k_idx.flatten(-2)).view(G, num_blocks, width, e)
    out, lse = attend(qs, ks, vs, scale=scale, bias=bs.reshape(G, num_blocks, 1, width))
    del qs, ks, vs
    q_pos = _inverse(q_order)  # (..., n): where each query sits in the sorted order
    out = _gather(out.view(*lead, -1, e), q_pos)
    lse = _gather(lse.view(*lead, -1, 1), q_pos)
    return out, lse


def causal_hyper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    lsh: AngularLSH,
    block_size: int,
    sample_size: int,
    min_seq_len: int,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal HyperAttention for n == m, the recursion on halves unrolled into levels.

    q/k/v (..., n, d|e), key_bias broadcastable to (..., n). Exact at or below `min_seq_len`.
    Above it the length is padded at the end to S * 2^L (S <= min_seq_len; a padded key comes
    after every real query, so no real query sees it) and split into 2^L segments of S. The
    diagonal segments are exact causal problems, all in one batched call; then level by level
    (segment pairs of size T = S, 2S, ..., N/2) the second half of each pair attends to the
    first half, a non-causal problem (exact when T <= min_seq_len, HyperAttention otherwise),
    every pair of a level in one batched call, merged into the running result by log-sum-exps.
    """
    *lead, n, d = q.shape
    e = v.shape[-1]
    kb = None if key_bias is None else key_bias.float().expand(*lead, n)
    if n <= min_seq_len:
        bias = None if kb is None else kb.reshape(-1, 1, 1, n)
        o, l = attend(q.reshape(-1, 1, n, d), k.reshape(-1, 1, n, d), v.reshape(-1, 1, n, e), scale=scale, bias=bias, causal=True)
        return o.view(*lead, n, e), l.view(*lead, n, 1)
    levels = math.ceil(math.log2(n / min_seq_len))
    seg = math.ceil(n / 2**levels)
    total = seg * 2**levels
    pad = total - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    kb = F.pad(q.new_zeros(*lead, n, dtype=torch.float32) if kb is None else kb, (0, pad), value=float("-inf"))
    q_valid = torch.arange(total, device=q.device) < n  # (N,)
    q4, k4, v4, kb4 = (t.reshape(-1, *t.shape[len(lead):]) for t in (q, k, v, kb))  # (G, N, .)
    G = q4.shape[0]
    out, lse = attend(
        q4.view(G, 2**levels, seg, d), k4.view(G, 2**levels, seg, d), v4.view(G, 2**levels, seg, e),
        scale=scale, bias=kb4.view(G, 2**levels, 1, seg), causal=True,
    )
    out, lse = out.reshape(G, total, e), lse.reshape(G, total, 1)
    q_rank, k_rank = lsh(q4), lsh(k4)  # (G, N): a vector's bucket is the same at every level
    for level in range(levels, 0, -1):
        pairs, size = 2 ** (level - 1), seg * 2 ** (levels - level)
        qv = q4.view(G, pairs, 2, size, d)[:, :, 1]  # (G, P, T, d): second halves ask
        kv = k4.view(G, pairs, 2, size, d)[:, :, 0]  # first halves answer
        vv = v4.view(G, pairs, 2, size, e)[:, :, 0]
        bv = kb4.view(G, pairs, 2, size)[:, :, 0]  # (G, P, T)
        if size <= min_seq_len:
            o, l = attend(qv, kv, vv, scale=scale, bias=bv[:, :, None, :])
        else:
            valid = q_valid.view(pairs, 2, size)[:, 1]  # (P, T)
            ranks = (q_rank.view(G, pairs, 2, size)[:, :, 1], k_rank.view(G, pairs, 2, size)[:, :, 0])
            o, l = hyper_attention(
                qv, kv, vv, scale=scale, lsh=lsh, block_size=block_size, sample_size=sample_size, key_bias=bv, query_valid=valid, ranks=ranks
            )
        ov, lv = out.view(G, pairs, 2, size, e), lse.view(G, pairs, 2, size, 1)
        if out.requires_grad:  # autograd keeps the old halves: build new tensors
            merged_o, merged_l = merge_attention(ov[:, :, 1], lv[:, :, 1], o, l)
            out = torch.stack([ov[:, :, 0], merged_o], dim=2).view(G, total, e)
            lse = torch.stack([lv[:, :, 0], merged_l], dim=2).view(G, total, 1)
        else:
            _merge_into(ov[:, :, 1], lv[:, :, 1], o, l)
        del o, l
    return out[:, :n].reshape(*lead, n, e), lse[:, :n].reshape(*lead, n, 1)



def _off_diagonal(q: Tensor, k: Tensor, v: Tensor, *, min_seq_len: int, key_bias: Tensor | None, **part) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """A block every query sees in full: exact when small, HyperAttention otherwise."""
    if k.shape[-2] <= min_seq_len:
        return attend(q, k, v, scale=part["scale"], bias=None if key_bias is None else key_bias.float()[..., None, :])
    return hyper_attention(q, k, v, **part, key_bias=key_bias)


class HyperAttentionKernel(nn.Module):
    """A kernel with the exact kernels' signature that runs HyperAttention above `min_seq_len`
    keys and the given exact kernel at or below it.

    Above the threshold it supports key-padding masks; a logit bias (ALiBi, T5) or a general
    mask raise, since the sampled estimate would need them for every (query, key) pair.
    """

    approximates_softmax = True  # benchmarks print its error against exact attention

    def __init__(self, head_dim: int, *, exact: Kernel, min_seq_len: int, block_size: int, sample_size: int, num_bits: int) -> None:
        super().__init__()
        self.exact = exact
        self.lsh = AngularLSH(head_dim, num_bits)
        self.min_seq_len, self.block_size, self.sample_size = min_seq_len, block_size, sample_size
        self.chunk_elements = 1 << 20  # q elements per inference chunk (8 MiB in fp32)

    def keys_per_query(self, queries: int, keys: int, causal: bool) -> float:
        """Keys each query scores: every key at or below min_seq_len keys (exact attention);
        above, its sorted block and the sampled keys (the hashing is not counted)."""
        if keys <= self.min_seq_len:
            return keys / 2 if causal else float(keys)
        return float(min(keys, self.block_size + self.sample_size))

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> Tensor:
        """q (b, h, n, d), k/v (b, g, m, d) -> (b, h, n, d)."""
        n, m = q.shape[2], k.shape[2]
        if m <= self.min_seq_len or (causal and n > m):
            return self.exact(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout=dropout)
        if bias is not None or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1)):
            raise ValueError(
                f"hyper attention above min_seq_len={self.min_seq_len} keys supports key-padding masks only, "
                "not a logit bias (alibi, t5) or a per-query mask; use positional kind rope/none, or raise "
                "model.attention.options.min_seq_len"
            )
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        key_bias = None
        if mask is not None:
            key_bias = torch.zeros(mask.shape[0], 1, m, device=q.device).masked_fill(~mask[:, :, 0], float("-inf"))  # (b|1, 1, m)
            key_bias = key_bias.expand(q.shape[0], 1, m)
        b, h = q.shape[:2]
        groups = h // k.shape[1]
        # a few (batch, head) rows at a time, so that temporaries stay a small multiple of one
        # chunk of q whatever the batch, heads and length (the same chunks with and without
        # gradients, so that both draw the same samples)
        fused = _fused(q, k, v)
        out = v.new_empty(b, h, n, v.shape[-1]) if fused else None
        rows: list[list[Tensor]] = []
        step = max(1, self.chunk_elements // (m * q.shape[-1]))
        for i in range(b):
            rows.append([])
            for h0 in range(0, h, step):
                h1 = min(h, h0 + step)
                kv_heads = torch.arange(h0, h1, device=q.device) // groups
                kc, vc = (k[i : i + 1, h0:h1], v[i : i + 1, h0:h1]) if groups == 1 else (k[i : i + 1, kv_heads], v[i : i + 1, kv_heads])
                kb = None if key_bias is None else key_bias[i : i + 1]
                part = self._rows(q[i : i + 1, h0:h1], kc, vc, kb, scale, causal)
                if out is not None:
                    out[i : i + 1, h0:h1] = part
                else:
                    rows[-1].append(part.to(v.dtype))
        return out if out is not None else torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)

    def _rows(self, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float, causal: bool) -> Tensor:
        """HyperAttention of q (b, h, n, d) against k/v (b, h, m, d|e) with one key head per query
        head; key_bias (b, 1, m) or None. Returns (b, h, n, e) fp32."""
        n, m = q.shape[2], k.shape[2]
        part = dict(scale=scale, lsh=self.lsh, block_size=self.block_size, sample_size=self.sample_size)
        if not causal:
            return hyper_attention(q, k, v, **part, key_bias=key_bias)[0]
        p = m - n  # keys before the first query: all of them visible to every query
        kb_new = None if key_bias is None else key_bias[..., p:]
        out, lse = causal_hyper_attention(q, k[:, :, p:], v[:, :, p:], **part, min_seq_len=self.min_seq_len, key_bias=kb_new)
        if p:
            kb_old = None if key_bias is None else key_bias[..., :p]
            o_old, l_old = _off_diagonal(q, k[:, :, :p], v[:, :, :p], **part, min_seq_len=self.min_seq_len, key_bias=kb_old)
            out, _ = merge_attention(out, lse, o_old, l_old)
        return out


@dataclass
class HyperOptions:
    """Options of attention kind 'hyper'.

    min_seq_len: at or below this many keys, exact attention runs (the configured kernel);
    block_size: keys per block of the sorted block-diagonal part;
    sample_size: uniformly sampled key columns per head for the rest of each row;
    num_bits: hyperplanes of the angular LSH (2^num_bits buckets).
    """

    min_seq_len: int = 1024
    block_size: int = 256
    sample_size: int = 256
    num_bits: int = 7


@ATTENTIONS.register("hyper")
def build_hyper(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Multi-head attention whose kernel is HyperAttention above `min_seq_len` keys."""
    opts = parse_options(HyperOptions, cfg.options, "model.attention.options (hyper)")
    if opts.block_size < 1 or opts.sample_size < 0 or opts.min_seq_len < 1 or not 1 <= opts.num_bits <= 20:
        raise ConfigError(
            "model.attention.options: block_size and min_seq_len must be >= 1, sample_size >= 0 and "
            f"num_bits in [1, 20] (got {opts})"
        )
    if cfg.dropout:
        raise ConfigError("attention kind 'hyper' does not support attention dropout; set model.attention.dropout=0")
    head_dim = head_dim_of(cfg, ctx.dim)
    kernel = HyperAttentionKernel(
        head_dim,
        exact=KERNELS.get(cfg.kernel),
        min_seq_len=opts.min_seq_len,
        block_size=opts.block_size,
        sample_size=opts.sample_size,
        num_bits=opts.num_bits,
    )
    return mha_from_config(cfg, ctx, kernel=kernel)
