"""Memory-efficient exact attention: an online softmax over key blocks with a recomputing
backward, so neither pass stores the n x m attention matrix.

Rabe & Staats 2021 ("Self-attention does not need O(n^2) memory") and Dao et al. 2022
(FlashAttention): the forward keeps, per query, the running maximum and sum of the softmax and
an unnormalised output, and saves only the output and the log-sum-exp; the backward walks the
blocks again and recomputes each block's probabilities from q, k and the log-sum-exp.

Masks and biases are generated one block at a time: causality and sparsity patterns from
indices (patterns.py), positional biases (ALiBi, T5) from position slices through a
`BlockBias`, a relative encoding's term computed from the queries (Shaw et al. 2018's keys) from
each query block, and dense user masks/biases are sliced. Blocks a pattern leaves empty are
skipped.

Legend: `b` batch, `h` query heads, `g` key/value heads, `r = h / g`, `n` queries, `m` keys,
`d` head dim, `bn`/`bm` query/key block sizes. Queries are the last n of m positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kernels import attention_weights
from .native_kernels import native_softmax
from .registry import KERNELS
from .masks import as_4d, combine_masks
from ..positional.bias import ALiBi
from .block_bias import BlockBias, PositionalBlockBias, query_aware, value_aware
from .patterns import FULL, NONE, PARTIAL, Causal, Intersection, Pattern

MASK_CACHE_ENTRIES = 64  # reused pattern-mask blocks kept per call, at most
DEFAULT_Q_BLOCK = 256
DEFAULT_K_BLOCK = 256
LOG2E = 1.4426950408889634  # logits are kept in base 2: exp2 is much cheaper than exp on CPUs


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
    """Everything the forward and backward share, besides the differentiable tensors.

    Blocks are computed as batched matrix products over `b * g` key/value groups, the `r`
    query heads of a group stacked along the rows: logits (b*g, r*bn, bm), viewed as
    (b, h, bn, bm) to add biases and masks."""

    pattern: Pattern | None
    mask: Tensor | None  # 4-D bool, broadcastable to (b, h, n, m)
    block_bias: BlockBias | None
    scale: float
    n: int
    m: int
    schedule: list[tuple[int, int, list[tuple[int, int, int]]]] = field(default_factory=list)
    q_block: int = DEFAULT_Q_BLOCK
    k_block: int = DEFAULT_K_BLOCK
    _blocked: dict = field(default_factory=dict)  # (diagonal offset, bn, bm) -> (bn, bm) bool

    def blocked(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> Tensor:
        """The (bn, bm) bool of keys the pattern hides in a PARTIAL block (True = hidden),
        reused across blocks at the same diagonal offset for translation-invariant patterns."""
        off = self.m - self.n
        key = (q0 + off - k0, q1 - q0, k1 - k0)
        hit = self._blocked.get(key)
        if hit is not None:
            return hit
        qi = torch.arange(q0 + off, q1 + off, device=device)
        kj = torch.arange(k0, k1, device=device)
        out = ~self.pattern.mask(qi, kj)  # type: ignore[union-attr]
        if self.pattern.translation_invariant and len(self._blocked) < MASK_CACHE_ENTRIES:  # type: ignore[union-attr]
            self._blocked[key] = out
        return out

    def logits(
        self, qg: Tensor, kt: Tensor, bias: Tensor | None, blk: tuple[int, int, int, int, int], extra: Tensor | None, h: int,
        scratch: "_Scratch | None" = None,
    ) -> Tensor:
        """Masked base-2 logits (b*g, r*bn, bm) of one block. qg: the query block (b*g, r*bn, d)
        already multiplied by scale * log2(e); kt: the key block transposed (b*g, d, bm).
        Written into `scratch` when given (valid until its next use)."""
        q0, q1, k0, k1, state = blk
        if scratch is None:
            s = torch.bmm(qg, kt)  # (b*g, r*bn, bm)
        else:
            s = torch.bmm(qg, kt, out=scratch.get((qg.shape[0], qg.shape[1], kt.shape[2])))
        if bias is None and extra is None and self.mask is None and state != PARTIAL:
            return s
        s4 = s.view(-1, h, q1 - q0, k1 - k0)  # (b, h, bn, bm)
        if bias is not None:
            s4.add_(_slice(bias, q0, q1, k0, k1).to(s.dtype), alpha=LOG2E)
        if extra is not None:
            s4.add_(extra.to(s.dtype), alpha=LOG2E)
        if self.mask is not None:
            s4.masked_fill_(~_slice(self.mask, q0, q1, k0, k1), float("-inf"))
        if state == PARTIAL:
            s4.masked_fill_(self.blocked(q0, q1, k0, k1, s.device), float("-inf"))
        return s

    def value_block(self, p: Tensor, q0: int, q1: int, k0: int, k1: int, h: int) -> Tensor | None:
        """The block bias's value term for the block's weights p (b*g, r*bn, bm), as the rows of
        the accumulator (b*g, r*bn, d); None when it has none."""
        if not value_aware(self.block_bias):
            return None
        term = self.block_bias.value_term(p.view(-1, h, q1 - q0, k1 - k0), q0, q1, k0, k1)  # type: ignore[attr-defined]
        return None if term is None else term.reshape(p.shape[0], p.shape[1], -1)

    def bias_block(self, q0: int, q1: int, k0: int, k1: int, q_block: Tensor | None = None) -> Tensor | None:
        """The block's positional bias, plus its query-aware term computed from `q_block`, the
        (b, h, bn, d) queries [q0, q1), when the block bias has one."""
        if self.block_bias is None:
            return None
        out = self.block_bias(q0, q1, k0, k1)
        if q_block is not None and query_aware(self.block_bias):
            term = self.block_bias.query_term(q_block, q0, q1, k0, k1)  # type: ignore[attr-defined]
            if term is not None:
                out = term if out is None else out + term
        return out


def _schedule(pattern: Pattern | None, n: int, m: int, q_block: int, k_block: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """For each query block, the key blocks that are not empty, with their state. A PARTIAL key
    block wider than the query block is split into pieces as wide as the query block, so the
    fully visible pieces need no mask and the empty ones are skipped (e.g. the causal
    diagonal becomes one square block)."""
    off = m - n
    out = []
    for q0 in range(0, n, q_block):
        q1 = min(q0 + q_block, n)
        blocks = []
        for k0 in range(0, m, k_block):
            k1 = min(k0 + k_block, m)
            state = FULL if pattern is None else pattern.block_state(q0 + off, q1 + off, k0, k1)
            if state == PARTIAL and k1 - k0 > q1 - q0:
                for p0 in range(k0, k1, q1 - q0):
                    p1 = min(p0 + q1 - q0, k1)
                    piece = pattern.block_state(q0 + off, q1 + off, p0, p1)  # type: ignore[union-attr]
                    if piece != NONE:
                        blocks.append((p0, p1, piece))
            elif state != NONE:
                blocks.append((k0, k1, state))
        out.append((q0, q1, blocks))
    return out


class _Scratch:
    """One reusable buffer for per-block temporaries. Allocating a fresh multi-megabyte tensor
    for every block costs page faults each time (the allocator hands large blocks back to the
    OS), which on CPU is a large share of a block's work; a slice of one buffer costs nothing."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.empty(numel, dtype=dtype, device=device)

    def get(self, shape: tuple[int, ...]) -> Tensor:
        """A contiguous tensor of `shape` over the buffer (its previous contents are garbage)."""
        return self.buf[: math.prod(shape)].view(shape)


def _block_scratch(plan: "_Plan", rows_per_query: int, bg: int, dtype: torch.dtype, device: torch.device) -> "_Scratch":
    """A buffer big enough for one (b*g, r*bn, bm) block of the plan's schedule."""
    widest = max((k1 - k0 for _, _, blocks in plan.schedule for k0, k1, _ in blocks), default=1)
    tallest = max((q1 - q0 for q0, q1, _ in plan.schedule), default=1)
    return _Scratch(bg * rows_per_query * tallest * widest, dtype, device)


def _query_groups(x: Tensor, q0: int, q1: int, g: int) -> Tensor:
    """Rows [q0, q1) of (b, h, n, d) as (b*g, r*bn, d): each group's r heads stacked."""
    b, h, _, d = x.shape
    return x[:, :, q0:q1].reshape(b * g, (h // g) * (q1 - q0), d)


def _fused_args(plan: _Plan) -> tuple[Tensor, int] | None:
    """When the C++ block loops can run `plan` (no mask or pattern besides causality; no
    positional bias, or ALiBi over consecutive positions with one offset for every row): the
    ALiBi slopes (empty without) and the first query's position minus the first key's. Else None."""
    if (plan.mask is not None or not (plan.pattern is None or type(plan.pattern) is Causal) or query_aware(plan.block_bias)
            or value_aware(plan.block_bias)):
        return None
    bias = plan.block_bias
    if bias is None:
        return _NO_SLOPES, 0
    if not isinstance(bias, PositionalBlockBias) or type(bias.positional) is not ALiBi or not bias.reusable():
        return None
    slopes = bias.positional.slopes.float().contiguous()
    return slopes, int(bias.q_pos[0, 0] - bias.k_pos[0, 0])


_NO_SLOPES = torch.empty(0)


class _ChunkedAttention(torch.autograd.Function):
    """Forward: online softmax over key blocks. Backward: recompute each block's probabilities."""

    @staticmethod
    def forward(ctx, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *params: Tensor) -> Tensor:  # type: ignore[override]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        b, h, n, d = q.shape
        g, m = k.shape[1], k.shape[2]
        c = plan.scale * LOG2E  # folded into each query block (no scaled copy of all of q)
        native = native_softmax(q.device, acc_dtype)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        fused = _fused_args(plan) if native is not None and q.dtype == k.dtype == v.dtype == torch.float32 and bias is None else None
        if fused is not None:
            # the whole block loop in C++ (cpu_softmax.cpp), one parallel region per call
            out, lse = native.chunked_forward(q.contiguous(), k.contiguous(), v.contiguous(), plan.scale,
                                              plan.pattern is not None, plan.q_block, plan.k_block, *fused)
            ctx.fused = fused
            ctx.save_for_backward(q, k, v, out, lse, *params)
            return out
        ctx.fused = None
        k3 = k.to(acc_dtype).reshape(b * g, m, d)  # (b*g, m, d)
        v3 = v.to(acc_dtype).reshape(b * g, m, d)
        k3t = k3.transpose(1, 2)  # (b*g, d, m)
        out = torch.empty(b, h, n, d, dtype=acc_dtype, device=q.device)
        lse = torch.empty(b, h, n, 1, dtype=acc_dtype, device=q.device)
        lowest = torch.finfo(acc_dtype).min
        scratch = _block_scratch(plan, h // g, b * g, acc_dtype, q.device)
        tallest = max((q1 - q0 for q0, q1, _ in plan.schedule), default=1)
        q_scratch, acc_scratch = (_Scratch(b * h * tallest * d, acc_dtype, q.device) for _ in range(2))
        for q0, q1, blocks in plan.schedule:
            bn = q1 - q0
            qg = torch.mul(q[:, :, q0:q1], c, out=q_scratch.get((b, h, bn, d))).view(b * g, (h // g) * bn, d)  # (b*g, r*bn, d)
            rows = qg.shape[1]
            # the running max starts at the lowest finite value, not -inf: a row whose keys are all
            # masked so far then gets p = exp2(-inf - lowest) = 0 and alpha = 1 with no NaN guard
            row_max = torch.full((b * g, rows, 1), lowest, dtype=acc_dtype, device=q.device)
            row_sum = torch.zeros(b * g, rows, 1, dtype=acc_dtype, device=q.device)
            acc = acc_scratch.get((b * g, rows, d)).zero_()
            for k0, k1, state in blocks:
                extra = plan.bias_block(q0, q1, k0, k1, q[:, :, q0:q1])
                s = plan.logits(qg, k3t[:, :, k0:k1], bias, (q0, q1, k0, k1, state), extra, h, scratch)
                if native is not None and s.is_contiguous():  # the same steps as below, one pass per row
                    alpha = native.online_softmax_(s, row_max, row_sum)
                    acc.mul_(alpha).baddbmm_(s, v3[:, k0:k1])
                    p = s
                else:
                    new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
                    p = s.sub_(new_max).exp2_()  # (b*g, r*bn, bm), in place over the logits
                    alpha = row_max.sub_(new_max).exp2_()
                    row_sum.mul_(alpha).add_(p.sum(-1, keepdim=True))
                    acc.mul_(alpha).baddbmm_(p, v3[:, k0:k1])
                    row_max = new_max
                term = plan.value_block(p, q0, q1, k0, k1, h)  # linear in p: rescaled with the rest of acc
                if term is not None:
                    acc += term.to(acc.dtype)
            empty = row_sum == 0
            acc.div_(row_sum.masked_fill(empty, 1.0))
            out[:, :, q0:q1] = acc.view(b, h, bn, d)  # rows with no key stay 0 (acc is 0)
            lse[:, :, q0:q1] = row_max.masked_fill_(empty, 0.0).add_(row_sum.log2()).masked_fill_(empty, float("inf")).view(b, h, bn, 1)
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
        g, m = k.shape[1], k.shape[2]
        c = plan.scale * LOG2E
        do = dout.to(acc_dtype)
        delta = (do * out).sum(-1, keepdim=True)  # (b, h, n, 1)
        if ctx.fused is not None:  # the forward ran in C++: so does the backward (same conditions)
            native = native_softmax(q.device, acc_dtype)
            dq, dk, dv = native.chunked_backward(q.contiguous(), k.contiguous(), v.contiguous(), lse, do.contiguous(), delta,
                                                 plan.scale, plan.pattern is not None, plan.q_block, plan.k_block, *ctx.fused)
            return (None, dq, dk, dv, None, *(None for _ in params))
        k3 = k.to(acc_dtype).reshape(b * g, m, d)  # (b*g, m, d)
        v3 = v.to(acc_dtype).reshape(b * g, m, d)
        k3t, v3t = k3.transpose(1, 2), v3.transpose(1, 2)  # (b*g, d, m)
        dq = torch.empty(b, h, n, d, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(b * g, m, d, dtype=acc_dtype, device=q.device)
        dv = torch.zeros_like(dk)
        need_bias = bias is not None and ctx.needs_input_grad[4]
        dbias = torch.zeros(bias.shape, dtype=acc_dtype, device=q.device) if need_bias else None  # type: ignore[union-attr]
        dparams = [torch.zeros_like(p) for p in params]
        scratch = _block_scratch(plan, h // g, b * g, acc_dtype, q.device)
        dp_scratch = _block_scratch(plan, h // g, b * g, acc_dtype, q.device)
        native = native_softmax(q.device, acc_dtype)
        # a query-aware term's share of dq, through autograd on each block's term (its gradient
        # with respect to the query block, added after dq is scaled below)
        terms_of_q = query_aware(plan.block_bias)
        values_too = value_aware(plan.block_bias)
        dq_terms = torch.zeros(b, h, n, d, dtype=acc_dtype, device=q.device) if terms_of_q and ctx.needs_input_grad[1] else None
        for q0, q1, blocks in plan.schedule:
            bn = q1 - q0
            qg = _query_groups(q, q0, q1, g).to(acc_dtype) * c  # (b*g, r*bn, d), a new tensor
            dog = _query_groups(do, q0, q1, g)
            lse_g = _query_groups(lse, q0, q1, g).contiguous()  # (b*g, r*bn, 1)
            delta_g = _query_groups(delta, q0, q1, g).contiguous()
            dqg = torch.zeros_like(qg)
            q_leaf = q[:, :, q0:q1].detach().requires_grad_(dq_terms is not None) if terms_of_q else None
            leaves = ([q_leaf] if dq_terms is not None else []) + list(params)
            for k0, k1, state in blocks:
                with torch.enable_grad():
                    extra = plan.bias_block(q0, q1, k0, k1, q_leaf)
                s = plan.logits(qg, k3t[:, :, k0:k1], bias, (q0, q1, k0, k1, state), None if extra is None else extra.detach(), h, scratch)
                if native is not None and s.is_contiguous():
                    native.exp2_shift_(s, lse_g)
                    p = s  # (b*g, r*bn, bm)
                else:
                    p = s.sub_(lse_g).exp2_()
                dv[:, k0:k1].baddbmm_(p.transpose(1, 2), dog)
                dp = torch.bmm(dog, v3t[:, :, k0:k1], out=dp_scratch.get(tuple(p.shape)))  # (b*g, r*bn, bm)
                if values_too:  # the value term's share of dp, and its parameters' gradients, by autograd on the block
                    with torch.enable_grad():
                        p_leaf = p.detach().view(b, h, bn, k1 - k0).requires_grad_()
                        term = plan.block_bias.value_term(p_leaf, q0, q1, k0, k1)  # type: ignore[union-attr]
                    if term is not None:
                        grads = torch.autograd.grad(term, [p_leaf, *params], dog.reshape(b, h, bn, d).to(term.dtype), allow_unused=True)
                        if grads[0] is not None:
                            dp += grads[0].reshape(dp.shape).to(dp.dtype)
                        for acc, grad in zip(dparams, grads[1:]):
                            if grad is not None:
                                acc += grad
                if native is not None and p.is_contiguous():
                    native.softmax_grad_(p, dp, delta_g)
                    ds = p
                else:
                    ds = p.mul_(dp.sub_(delta_g))  # in place over p
                dqg.baddbmm_(ds, k3[:, k0:k1])
                dk[:, k0:k1].baddbmm_(ds.transpose(1, 2), qg)
                if dbias is not None or (leaves and extra is not None and extra.requires_grad):
                    ds4 = ds.view(b, h, bn, k1 - k0)
                    if dbias is not None:
                        blk = _slice(dbias, q0, q1, k0, k1)
                        blk += _sum_to(ds4, blk.shape)  # type: ignore[union-attr]
                    if leaves and extra is not None and extra.requires_grad:
                        grads = list(torch.autograd.grad(extra, leaves, _sum_to(ds4, extra.shape).to(extra.dtype), allow_unused=True))
                        if dq_terms is not None:
                            grad_q = grads.pop(0)
                            if grad_q is not None:
                                dq_terms[:, :, q0:q1] += grad_q
                        for acc, grad in zip(dparams, grads):
                            if grad is not None:
                                acc += grad
            dq[:, :, q0:q1] = dqg.view(b, h, bn, d)
        dq = dq.mul_(plan.scale)
        if dq_terms is not None:
            dq += dq_terms
        dq = dq.to(q.dtype)
        dk = dk.mul_(1.0 / LOG2E).view(b, g, m, d)  # the queries it was multiplied with carried log2(e)
        dv = dv.view(b, g, m, d)
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
        block_bias: a bias produced per block (ALiBi, T5 from positions), see `BlockBias`; when
            it is query-aware, its term from each query block too (gradients reach q through it).
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
        q_block=q_block,
        k_block=k_block,
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

    def keys_per_query(self, n: int, m: int, causal: bool) -> float:
        """The keys each of `n` queries (the last of `m`) is scored against on this kernel's CPU
        path: the area of every block it computes (the blocks the pattern and causality leave
        non-empty, whole), over n: the work it does, which the model summary counts."""
        pattern = self.pattern
        if causal:
            pattern = Causal() if pattern is None else Intersection(pattern, Causal())
        preferred = pattern.preferred_blocks if pattern is not None and pattern.preferred_blocks else None
        q_block = self.q_block or (preferred[0] if preferred else DEFAULT_Q_BLOCK)
        k_block = self.k_block or (preferred[1] if preferred else DEFAULT_K_BLOCK)
        area = sum((q1 - q0) * (k1 - k0) for q0, q1, blocks in _schedule(pattern, n, m, q_block, k_block) for k0, k1, _ in blocks)
        return area / max(n, 1)

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
        """See `chunked_attention`. On CUDA: SDPA's fused kernels, or FlexAttention for
        patterns, masks and biases (attention.flex); this kernel's loops where neither applies."""
        if q.device.type == "cuda":
            from .flex import cuda_attention

            out = cuda_attention(q, k, v, pattern=self.pattern, mask=mask, bias=bias, causal=causal, scale=scale,
                                 dropout=dropout, block_bias=block_bias)
            if out is not None:
                return out
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
