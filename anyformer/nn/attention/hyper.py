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

    def forward(self, x: Tensor) -> Tensor:
        """x (b, h, n, d) -> bucket ranks (b, h, n), int64."""
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


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax attentions over disjoint key sets into the one over their union
    (rows empty in both stay 0 with lse -inf, and their gradients stay finite)."""
    shift = _finite_or_zero(torch.maximum(lse1, lse2).detach())
    e1, e2 = (lse1 - shift).exp(), (lse2 - shift).exp()
    total = e1 + e2
    safe = _positive_or_one(total)
    return o1 * (e1 / safe) + o2 * (e2 / safe), _lse(shift, total)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (b, h, n, c) rows picked by idx (b, h, k) -> (b, h, k, c)."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def hyper_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, lsh: AngularLSH, block_size: int, sample_size: int, key_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Non-causal HyperAttention: sorted-LSH block-diagonal part plus sampled columns.

    q (b, h, n, d), k/v (b, h, m, d|e), key_bias (b, h|1, m) additive per key (-inf = padding).
    Returns out (b, h, n, e) and lse (b, h, n, 1).
    """
    b, h, n, d = q.shape
    m, e = k.shape[2], v.shape[-1]
    key_bias = q.new_zeros(1, 1, m, dtype=torch.float32) if key_bias is None else key_bias.float()
    key_bias = key_bias.expand(b, h, m)
    num_blocks = math.ceil(m / block_size)
    qb = math.ceil(n / num_blocks)
    q_order = lsh(q).argsort(dim=-1, stable=True)  # (b, h, n)
    k_order = lsh(k).argsort(dim=-1, stable=True)  # (b, h, m)
    q_pad, k_pad = num_blocks * qb - n, num_blocks * block_size - m
    qs = F.pad(_gather(q, q_order), (0, 0, 0, q_pad)).view(b, h, num_blocks, qb, d)  # (b, h, B, Q, d)
    ks = F.pad(_gather(k, k_order), (0, 0, 0, k_pad)).view(b, h, num_blocks, block_size, d)  # (b, h, B, K, d)
    vs = F.pad(_gather(v, k_order), (0, 0, 0, k_pad)).view(b, h, num_blocks, block_size, e)  # (b, h, B, K, e)
    bs = F.pad(key_bias.gather(2, k_order), (0, k_pad), value=float("-inf"))
    bs = bs.view(b, h, num_blocks, 1, block_size)  # (b, h, B, 1, K)
    o_blk, l_blk = attention_with_lse(qs, ks, vs, scale=scale, bias=bs)  # (b, h, B, Q, e), (b, h, B, Q, 1)
    q_pos = q_order.argsort(dim=-1)  # (b, h, n): where each query sits in the sorted order
    o_blk = _gather(o_blk.reshape(b, h, -1, e), q_pos)  # (b, h, n, e), original order
    l_blk = _gather(l_blk.reshape(b, h, -1, 1), q_pos)  # (b, h, n, 1)
    if num_blocks == 1 or sample_size == 0:
        return o_blk, l_blk
    idx = torch.randint(0, m, (b, h, sample_size), device=q.device)  # (b, h, s), with replacement
    k_block = k_order.argsort(dim=-1) // block_size  # (b, h, m) block of each key
    same_block = (q_pos // qb)[..., None] == k_block.gather(2, idx)[:, :, None, :]  # (b, h, n, s)
    bias_s = key_bias.gather(2, idx)[:, :, None, :] + math.log(m / sample_size)  # (b, h, 1, s)
    bias_s = bias_s.masked_fill(same_block, float("-inf"))
    o_s, l_s = attention_with_lse(q, _gather(k, idx), _gather(v, idx), scale=scale, bias=bias_s)
    return merge_attention(o_blk, l_blk, o_s, l_s)


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
    """Causal HyperAttention for n == m by recursion on halves: causal(top-left),
    causal(bottom-right) merged with the non-causal bottom-left block; exact at <= min_seq_len."""
    n = q.shape[2]
    kb = key_bias
    if n <= min_seq_len:
        return attention_with_lse(q, k, v, scale=scale, bias=None if kb is None else kb[:, :, None], causal=True)
    mid = n // 2
    part = dict(scale=scale, lsh=lsh, block_size=block_size, sample_size=sample_size)
    o1, l1 = causal_hyper_attention(
        q[:, :, :mid], k[:, :, :mid], v[:, :, :mid], **part, min_seq_len=min_seq_len, key_bias=None if kb is None else kb[..., :mid]
    )
    o2, l2 = causal_hyper_attention(
        q[:, :, mid:], k[:, :, mid:], v[:, :, mid:], **part, min_seq_len=min_seq_len, key_bias=None if kb is None else kb[..., mid:]
    )
    o3, l3 = _off_diagonal(q[:, :, mid:], k[:, :, :mid], v[:, :, :mid], **part, min_seq_len=min_seq_len, key_bias=None if kb is None else kb[..., :mid])
    o2, l2 = merge_attention(o2, l2, o3, l3)
    return torch.cat([o1, o2], dim=2), torch.cat([l1, l2], dim=2)


def _off_diagonal(q: Tensor, k: Tensor, v: Tensor, *, min_seq_len: int, key_bias: Tensor | None, **part) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """A block every query sees in full: exact when small, HyperAttention otherwise."""
    if k.shape[2] <= min_seq_len:
        return attention_with_lse(q, k, v, scale=part["scale"], bias=None if key_bias is None else key_bias[:, :, None])
    return hyper_attention(q, k, v, **part, key_bias=key_bias)


class HyperAttentionKernel(nn.Module):
    """A kernel with the exact kernels' signature that runs HyperAttention above `min_seq_len`
    keys and the given exact kernel at or below it.

    Above the threshold it supports key-padding masks; a logit bias (ALiBi, T5) or a general
    mask raise, since the sampled estimate would need them for every (query, key) pair.
    """

    def __init__(self, head_dim: int, *, exact: Kernel, min_seq_len: int, block_size: int, sample_size: int, num_bits: int) -> None:
        super().__init__()
        self.exact = exact
        self.lsh = AngularLSH(head_dim, num_bits)
        self.min_seq_len, self.block_size, self.sample_size = min_seq_len, block_size, sample_size

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
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        key_bias = None
        if mask is not None:
            key_bias = torch.zeros(mask.shape[0], 1, m, device=q.device).masked_fill(~mask[:, :, 0], float("-inf"))  # (b, 1, m)
        part = dict(scale=scale, lsh=self.lsh, block_size=self.block_size, sample_size=self.sample_size)
        if not causal:
            out, _ = hyper_attention(q, k, v, **part, key_bias=key_bias)
        else:
            p = m - n  # keys before the first query: all of them visible to every query
            kb_new = None if key_bias is None else key_bias[..., p:]
            out, lse = causal_hyper_attention(
                q, k[:, :, p:], v[:, :, p:], **part, min_seq_len=self.min_seq_len, key_bias=kb_new
            )
            if p:
                kb_old = None if key_bias is None else key_bias[..., :p]
                o_old, l_old = _off_diagonal(q, k[:, :, :p], v[:, :, :p], **part, min_seq_len=self.min_seq_len, key_bias=kb_old)
                out, _ = merge_attention(out, lse, o_old, l_old)
        return out.to(v.dtype)


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
