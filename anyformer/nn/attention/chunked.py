"""Memory-efficient exact attention: an online softmax over key blocks with a recomputing
backward, so neither pass stores the n x m attention matrix.

Rabe & Staats 2021 ("Self-attention does not need O(n^2) memory") and Dao et al. 2022
(FlashAttention): the forward keeps, per query, the running maximum and sum of the softmax and
an unnormalised output, and saves only the output and the log-sum-exp; the backward walks the
blocks again and recomputes each block's probabilities from q, k and the log-sum-exp.

Masks and biases are generated one block at a time: causality and sparsity patterns from
indices (patterns.py), positional biases (ALiBi, T5) from position slices through a
`BlockBias`, and dense user masks/biases are sliced. Blocks a pattern leaves empty are skipped.

Legend: `b` batch, `h` query heads, `g` key/value heads, `r = h / g`, `n` queries, `m` keys,
`d` head dim, `bn`/`bm` query/key block sizes. Queries are the last n of m positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .kernels import KERNELS, attention_weights
from .masks import as_4d, combine_masks
from .patterns import FULL, NONE, PARTIAL, Causal, Intersection, Pattern

DEFAULT_Q_BLOCK = 256
DEFAULT_K_BLOCK = 512
LOG2E = 1.4426950408889634  # logits are kept in base 2: exp2 is much cheaper than exp on CPUs


class BlockBias(Protocol):
    """An additive logit bias produced one block at a time (never the whole n x m matrix)."""

    def __call__(self, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        """The bias of queries [q0, q1) and keys [k0, k1), broadcastable to (b, h, bn, bm)."""
        ...

    def parameters(self) -> list[Tensor]:
        """Tensors the bias depends on that need gradients (e.g. a T5 bucket table)."""
        ...


@dataclass
class PositionalBlockBias:
    """The bias of a positional encoding (ALiBi, T5) for slices of (b, n) and (b, m) positions."""

    positional: torch.nn.Module
    q_pos: Tensor
    k_pos: Tensor

    def __call__(self, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        return self.positional.bias(self.q_pos[:, q0:q1], self.k_pos[:, k0:k1])

    def parameters(self) -> list[Tensor]:
        return [p for p in self.positional.parameters() if p.requires_grad]


def _slice(t: Tensor | None, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
    """A block of a 4-D tensor broadcastable to (b, h, n, m); size-1 dims stay whole."""
    if t is None:
        return None
    rows = slice(q0, q1) if t.shape[2] > 1 else slice(None)
    cols = slice(k0, k1) if t.shape[3] > 1 else slice(None)
    return t[:, :, rows, cols]


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum `x` over the dims where `shape` is 1 (the reverse of broadcasting)."""
    dims = [i for i, (a, s) in enumerate(zip(x.shape, shape)) if s == 1 and a != 1]
    x = x.sum(dims, keepdim=True) if dims else x
    return x.reshape(shape)


@dataclass
class _Plan:
    """Everything the forward and backward share, besides the differentiable tensors."""

    pattern: Pattern | None
    mask: Tensor | None  # 4-D bool, broadcastable to (b, h, n, m)
    block_bias: BlockBias | None
    scale: float
    n: int
    m: int
    schedule: list[tuple[int, int, list[tuple[int, int, int]]]] = field(default_factory=list)

    def logits(self, qs: Tensor, k: Tensor, bias: Tensor | None, blk: tuple[int, int, int, int, int], extra: Tensor | None) -> Tensor:
        """Masked base-2 logits (b, h, bn, bm) of one block; qs is the query block (b, h, bn, d)
        already multiplied by scale * log2(e)."""
        q0, q1, k0, k1, state = blk
        b, h, bn, d = qs.shape
        g = k.shape[1]
        kb = k[:, :, k0:k1]  # (b, g, bm, d)
        s = torch.matmul(qs.reshape(b, g, (h // g) * bn, d), kb.transpose(-1, -2))  # (b, g, r*bn, bm)
        s = s.view(b, h, bn, k1 - k0)
        if bias is not None:
            s = s.add_(_slice(bias, q0, q1, k0, k1).to(s.dtype), alpha=LOG2E)
        if extra is not None:
            s = s.add_(extra.to(s.dtype), alpha=LOG2E)
        allowed = _slice(self.mask, q0, q1, k0, k1)
        if state == PARTIAL:
            off = self.m - self.n
            qi = torch.arange(q0 + off, q1 + off, device=qs.device)
            kj = torch.arange(k0, k1, device=qs.device)
            allowed = combine_masks(allowed, self.pattern.mask(qi, kj))  # type: ignore[union-attr]
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s

    def bias_block(self, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        return None if self.block_bias is None else self.block_bias(q0, q1, k0, k1)


def _schedule(pattern: Pattern | None, n: int, m: int, q_block: int, k_block: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """For each query block, the key blocks that are not empty, with their state."""
    off = m - n
    out = []
    for q0 in range(0, n, q_block):
        q1 = min(q0 + q_block, n)
        blocks = []
        for k0 in range(0, m, k_block):
            k1 = min(k0 + k_block, m)
            state = FULL if pattern is None else pattern.block_state(q0 + off, q1 + off, k0, k1)
            if state != NONE:
                blocks.append((k0, k1, state))
        out.append((q0, q1, blocks))
    return out


class _ChunkedAttention(torch.autograd.Function):
    """Forward: online softmax over key blocks. Backward: recompute each block's probabilities."""

    @staticmethod
    def forward(ctx, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *params: Tensor) -> Tensor:  # type: ignore[override]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        b, h, n, d = q.shape
        g = k.shape[1]
        qs = q.to(acc_dtype) * (plan.scale * LOG2E)
        kf, vf = k.to(acc_dtype), v.to(acc_dtype)
        out = torch.zeros(b, h, n, d, dtype=acc_dtype, device=q.device)
        lse = torch.full((b, h, n, 1), float("inf"), dtype=acc_dtype, device=q.device)
        for q0, q1, blocks in plan.schedule:
            bn = q1 - q0
            qb = qs[:, :, q0:q1].contiguous()
            row_max = torch.full((b, h, bn, 1), float("-inf"), dtype=acc_dtype, device=q.device)
            row_sum = torch.zeros(b, h, bn, 1, dtype=acc_dtype, device=q.device)
            acc = torch.zeros(b, g, (h // g) * bn, d, dtype=acc_dtype, device=q.device)
            for k0, k1, state in blocks:
                s = plan.logits(qb, kf, bias, (q0, q1, k0, k1, state), plan.bias_block(q0, q1, k0, k1))
                new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
                safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)
                p = s.sub_(safe_max).exp2_()  # (b, h, bn, bm), in place over the logits
                alpha = (row_max - safe_max).exp2_()
                row_sum = row_sum * alpha + p.sum(-1, keepdim=True)
                pv = torch.matmul(p.view(b, g, -1, k1 - k0), vf[:, :, k0:k1])  # (b, g, r*bn, d)
                acc = acc.mul_(alpha.view(b, g, -1, 1)).add_(pv)
                row_max = new_max
            empty = row_sum == 0
            out[:, :, q0:q1] = (acc.view(b, h, bn, d) / row_sum.masked_fill(empty, 1.0)).masked_fill(empty, 0.0)
            safe_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
            lse[:, :, q0:q1] = (safe_max + row_sum.log2()).masked_fill(empty, float("inf"))
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(q, k, v, out, lse, *([bias] if bias is not None else []), *params)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        plan: _Plan = ctx.plan
        q, k, v, out, lse, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        params = rest[1:] if ctx.has_bias else rest
        acc_dtype = out.dtype
        b, h, n, d = q.shape
        g = k.shape[1]
        qs = q.to(acc_dtype) * (plan.scale * LOG2E)
        kf, vf = k.to(acc_dtype), v.to(acc_dtype)
        do = dout.to(acc_dtype)
        delta = (do * out).sum(-1, keepdim=True)  # (b, h, n, 1)
        dq = torch.zeros_like(qs)
        dk = torch.zeros(b, g, k.shape[2], d, dtype=acc_dtype, device=q.device)
        dv = torch.zeros_like(dk)
        need_bias = bias is not None and ctx.needs_input_grad[4]
        dbias = torch.zeros(bias.shape, dtype=acc_dtype, device=q.device) if need_bias else None  # type: ignore[union-attr]
        dparams = [torch.zeros_like(p) for p in params]
        for q0, q1, blocks in plan.schedule:
            bn = q1 - q0
            qb = qs[:, :, q0:q1].contiguous()
            qg = qb.view(b, g, -1, d)  # (b, g, r*bn, d)
            dog = do[:, :, q0:q1].reshape(b, g, -1, d)  # (b, g, r*bn, d)
            dqg = torch.zeros_like(qg)
            for k0, k1, state in blocks:
                bm = k1 - k0
                with torch.enable_grad():
                    extra = plan.bias_block(q0, q1, k0, k1)
                s = plan.logits(qb, kf, bias, (q0, q1, k0, k1, state), None if extra is None else extra.detach())
                p = s.sub_(lse[:, :, q0:q1]).exp2_()  # (b, h, bn, bm)
                pg = p.view(b, g, -1, bm)
                dv[:, :, k0:k1] += torch.matmul(pg.transpose(-1, -2), dog)
                dp = torch.matmul(dog, vf[:, :, k0:k1].transpose(-1, -2)).view(b, h, bn, bm)
                ds = p.mul_(dp.sub_(delta[:, :, q0:q1]))  # (b, h, bn, bm), in place over p
                dsg = ds.view(b, g, -1, bm)
                dqg += torch.matmul(dsg, kf[:, :, k0:k1])
                dk[:, :, k0:k1] += torch.matmul(dsg.transpose(-1, -2), qg)
                if dbias is not None:
                    blk = _slice(dbias, q0, q1, k0, k1)
                    blk += _sum_to(ds, blk.shape)  # type: ignore[union-attr]
                if params and extra is not None and extra.requires_grad:
                    grads = torch.autograd.grad(extra, params, _sum_to(ds, extra.shape).to(extra.dtype), allow_unused=True)
                    for acc, grad in zip(dparams, grads):
                        if grad is not None:
                            acc += grad
            dq[:, :, q0:q1] = dqg.view(b, h, bn, d)
        dq = (dq * plan.scale).to(q.dtype)
        dk = dk * (1.0 / LOG2E)  # the queries it was multiplied with carried log2(e)
        return (None, dq, dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype), *dparams)  # type: ignore[union-attr]


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
    block_bias: BlockBias | None = None,
    pattern: Pattern | None = None,
    q_block: int | None = None,
    k_block: int | None = None,
) -> Tensor:
    """Exact attention in O(n + m) memory for forward and backward (Rabe & Staats 2021; Dao et
    al. 2022), skipping the blocks that causality or `pattern` leave empty.

    Args:
        q: (b, h, n, d); k, v: (b, g, m, d) with h % g == 0 (grouped-query attention).
        mask: bool broadcastable to (b, h, n, m), True = attend (e.g. key padding (b, 1, 1, m)).
        bias: additive float broadcastable to (b, h, n, m); gets a gradient when it requires one.
        causal: query i sees keys j <= i + (m - n).
        scale: logit scale, default d ** -0.5.
        dropout: must be 0 (attention dropout is not supported by this kernel).
        block_bias: a bias produced per block (ALiBi, T5 from positions), see `BlockBias`.
        pattern: a sparsity pattern (patterns.py) in key coordinates.
        q_block, k_block: block sizes (default: the pattern's preference, else 512 x 1024).
    Returns: (b, h, n, d); a query with no visible key gives zeros.
    """
    if dropout > 0.0:
        raise ValueError(
            "the chunked attention kernel does not implement attention-probability dropout; set "
            "model.attention.dropout=0 or use the 'eager' or 'sdpa' kernel"
        )
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"chunked attention expects q (b, h, n, d) and k, v (b, g, m, d); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, h, n, d = q.shape
    g, m = k.shape[1], k.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    if causal:
        pattern = Causal() if pattern is None else Intersection(pattern, Causal())
    preferred = pattern.preferred_blocks if pattern is not None and pattern.preferred_blocks else None
    q_block = q_block or (preferred[0] if preferred else DEFAULT_Q_BLOCK)
    k_block = k_block or (preferred[1] if preferred else DEFAULT_K_BLOCK)
    plan = _Plan(
        pattern=pattern,
        mask=None if mask is None else as_4d(mask, b, h, n, m, "mask"),
        block_bias=block_bias,
        scale=d**-0.5 if scale is None else scale,
        n=n,
        m=m,
        schedule=_schedule(pattern, n, m, q_block, k_block),
    )
    bias4 = None if bias is None else as_4d(bias, b, h, n, m, "bias")
    params = block_bias.parameters() if block_bias is not None and torch.is_grad_enabled() else []
    return _ChunkedAttention.apply(plan, q, k, v, bias4, *params)


class ChunkedKernel:
    """The chunked kernel as a KERNELS entry, optionally bound to a sparsity pattern and block
    sizes. `lazy_bias = True` tells MultiHeadAttention to pass positional biases as a
    `BlockBias` (keyword `block_bias`) rather than as a dense (b, h, n, m) tensor."""

    lazy_bias = True

    def __init__(self, pattern: Pattern | None = None, *, q_block: int | None = None, k_block: int | None = None) -> None:
        self.pattern, self.q_block, self.k_block = pattern, q_block, k_block

    def __call__(
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
        block_bias: BlockBias | None = None,
    ) -> Tensor:
        """See `chunked_attention`."""
        return chunked_attention(
            q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout=dropout,
            block_bias=block_bias, pattern=self.pattern, q_block=self.q_block, k_block=self.k_block,
        )

    def weights(
        self, q: Tensor, k: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
        causal: bool = False, scale: float | None = None,
    ) -> Tensor:
        """The dense (b, h, n, m) attention probabilities under this kernel's pattern."""
        n, m = q.shape[2], k.shape[2]
        if self.pattern is not None:
            mask = combine_masks(mask, self.pattern.dense(n, m, q.device))
        return attention_weights(q, k, mask=mask, bias=bias, causal=causal, scale=scale)

    def __repr__(self) -> str:
        return f"ChunkedKernel(pattern={type(self.pattern).__name__ if self.pattern else None})"


KERNELS.register("chunked")(ChunkedKernel())
