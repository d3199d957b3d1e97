"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), self or cross, built from
injected parts, with the hook points attention variants override.

Legend: `b` batch, `n` query length, `m` key length, `d_model` width, `h` query heads,
`g` key/value heads, `d` head dim, `h'`/`e` heads and width of a variant's per-head output.

The forward pass is

    q, k, v = heads(x)           projections (injected modules), QK-norm
    q, k, v = position + cache   the stack's positional encoding; this layer's cache
    out = attend(q, k, v)        the kernel; or, when a variant changes logits or probabilities,
                                 logits -> modify_logits -> softmax -> combine -> @ v
    out = transform_heads(out)   a variant's per-head output transform
    return o_proj(merge(out))

so a variant subclasses `MultiHeadAttention` and overrides only the hook it changes:
`modify_logits` (e.g. a selection score), `combine` (e.g. shaped attention), `attend` (e.g.
several kernel calls, as differential attention makes) or `transform_heads` (e.g. a per-head
norm). Overriding `modify_logits` or `combine` routes the layer through the explicit path
(logits materialised); the other hooks keep the fused kernels.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError
from ..build_context import BuildContext
from ..kv_cache import CacheSpec, CrossKVCache, KVCache
from ..norm import NORMS
from .context import AttentionContext
from .cost import full_keys, softmax_flops
from .kernels import Kernel, attention_logits, eager_attention, full_mask, masked_softmax, repeat_kv
from .masks import combine_masks
from .registry import ATTENTIONS, KERNELS


def projections(
    dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, kv_dim: int | None = None, bias: bool = False, out_bias: bool | None = None
) -> dict[str, nn.Module]:
    """The four linear projections of multi-head attention, as keyword arguments for
    `MultiHeadAttention`: q (dim -> h*d), k and v (kv_dim -> g*d), o (h*d -> dim)."""
    kv_dim = kv_dim or dim
    return {
        "q_proj": nn.Linear(dim, num_heads * head_dim, bias=bias),
        "k_proj": nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias),
        "v_proj": nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias),
        "o_proj": nn.Linear(num_heads * head_dim, dim, bias=bias if out_bias is None else out_bias),
    }


def _apply(norm: nn.Module, x: Tensor) -> Tensor:
    """norm(x), without a module call for the absent norm (nn.Identity): decoding pays per call."""
    return x if type(norm) is nn.Identity else norm(x)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over `num_heads` heads (Vaswani et al. 2017), with
    `num_kv_heads` < `num_heads` for grouped-query (Ainslie et al. 2023) or multi-query
    (Shazeer 2019) attention.

    Args:
        q_proj, k_proj, v_proj, o_proj: the projections (any modules mapping the widths; see
            `projections`); k/v read the memory for cross-attention.
        num_heads: query heads `h`; num_kv_heads: key/value heads `g` (divides h; default h);
        head_dim: per-head width `d`.
        kernel: an exact kernel from KERNELS (eager, sdpa, chunked, ...).
        q_norm, k_norm: optional per-head norms of queries and keys (QK-norm).
        scale: logit scale; default d ** -0.5.
        dropout: attention-probability dropout in training.
    """

    def __init__(
        self,
        *,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        kernel: Kernel = eager_attention,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.kernel = kernel
        # kernels with `lazy_bias` take positional biases per block instead of a dense tensor
        self.lazy_bias = bool(getattr(kernel, "lazy_bias", False))
        self.scale = scale
        self.dropout = dropout
        cls = type(self)
        self.explicit = cls.modify_logits is not MultiHeadAttention.modify_logits or cls.combine is not MultiHeadAttention.combine

    @classmethod
    def standard(
        cls, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None, kv_dim: int | None = None,
        bias: bool = False, out_bias: bool | None = None, **kwargs: object,
    ) -> "MultiHeadAttention":
        """Attention with plain linear projections of `dim` (and `kv_dim` for cross-attention);
        other keyword arguments as the constructor."""
        head_dim = head_dim or dim // num_heads
        projs = projections(dim, num_heads, num_kv_heads or num_heads, head_dim, kv_dim=kv_dim, bias=bias, out_bias=out_bias)
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **projs, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ what it costs

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Scores and mixing per query token (anyformer/nn/attention/cost.py) over the keys each
        query is scored against: its kernel's `keys_per_query` (a block-sparse kernel counts
        the blocks it computes), else all of them (half under a causal mask)."""
        counter = getattr(self.kernel, "keys_per_query", None)
        attended = counter(queries, keys, causal) if counter is not None else full_keys(queries, keys, causal)
        return softmax_flops(self.num_heads, self.head_dim, attended)

    def step_flops(self, cached: int) -> float:
        """One decoding step: one query over the cached keys and its own."""
        return self.mixing_flops(1, cached + 1, causal=False)  # the last position: every earlier key is before it

    @property
    def bench_mode(self) -> str:
        """How `anyformer bench attention` times it: "kernel" (the kernel alone on ready q, k,
        v) when its math is its kernel's, "module" (projections included) when a hook of its
        own (modify_logits, combine, attend, transform_heads) changes it."""
        cls = type(self)
        own = any(getattr(cls, h) is not getattr(MultiHeadAttention, h) for h in ("modify_logits", "combine", "attend", "transform_heads"))
        return "module" if own else "kernel"

    # ------------------------------------------------------------------ structure

    def make_cache(self, spec: CacheSpec) -> nn.Module:
        """This layer's decoding cache: keys and values of `num_kv_heads` heads (rolling when
        the spec asks for a window)."""
        return spec.kv_cache(self.num_kv_heads, self.head_dim)

    def _heads(self, x: Tensor, proj: nn.Module, heads: int) -> Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, heads, self.head_dim).transpose(1, 2)  # (b, heads, n, d)

    def _kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        k = _apply(self.k_norm, self._heads(src, self.k_proj, self.num_kv_heads))  # (b, g, m, d)
        v = self._heads(src, self.v_proj, self.num_kv_heads)  # (b, g, m, d)
        return k, v

    def qkv(self, x: Tensor, ctx: AttentionContext, *, memory: Tensor | None, cache: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (b, h, n, d) and all keys/values (b, g, m, d): projected, normed, positioned
        and merged with the cache."""
        q = _apply(self.q_norm, self._heads(x, self.q_proj, self.num_heads))  # (b, h, n, d)
        if memory is None:
            k, v = self._kv(x)
            if cache is None:
                q, k = ctx.positional.rotate(q, k, ctx.q_pos, ctx.q_pos)
            else:
                q, k, v = cache.store(q, k, v, ctx)  # type: ignore[operator]  # cached keys in front
        elif cache is not None:
            k, v = cache.get_or_compute(lambda: self._kv(memory))  # type: ignore[operator]
        else:
            k, v = self._kv(memory)
        return q, k, v

    # ------------------------------------------------------------------ hook points

    def modify_logits(self, logits: Tensor, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor:
        """Hook: change the (b, h, n, m) fp32 logits (scaled, biases added) before masking and
        the softmax; the mask (padding, causality, patterns) is applied afterwards."""
        return logits

    def combine(self, probs: Tensor, ctx: AttentionContext) -> Tensor:
        """Hook: change the (b, h, n, m) probabilities before they weight the values."""
        return probs

    def transform_heads(self, out: Tensor, ctx: AttentionContext) -> Tensor:
        """Hook: a per-head transform of the attention output (b, h, n, d) -> (b, h', n, e)
        before the heads are merged and projected."""
        return out

    def logit_bias(self, q: Tensor, ctx: AttentionContext) -> Tensor | None:
        """The additive logit term of this layer: the context's bias (positional, user's mask)
        plus a query-aware positional term computed from these queries (`query_bias`)."""
        base = ctx.logit_bias()
        if not ctx.positional.query_aware:
            return base
        term = ctx.positional.query_bias(q, ctx.q_pos, ctx.k_pos, self.scale or q.shape[-1] ** -0.5)
        return base if term is None else term if base is None else base + term

    def probabilities(self, q: Tensor, k: Tensor, ctx: AttentionContext) -> Tensor:
        """The (b, h, n, m) attention probabilities, in fp32, through the logit and probability
        hooks; a kernel's sparsity pattern (if any) is applied as a mask."""
        n, m = q.shape[2], k.shape[2]
        mask = full_mask(ctx.mask, ctx.causal, n, m, q.device)
        pattern = getattr(self.kernel, "pattern", None)
        if pattern is not None:
            mask = combine_masks(mask, pattern.dense(n, m, q.device))
        logits = self.modify_logits(attention_logits(q, k, bias=self.logit_bias(q, ctx), scale=self.scale), q, k, ctx)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return self.combine(masked_softmax(logits), ctx)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Hook: the attention output (b, h, n, e) of q (b, h, n, d) over k, v (b, g, m, d/e).
        The fused kernel unless the layer changes logits or probabilities or weights are stored."""
        dropout = self.dropout if self.training else 0.0
        values = ctx.positional.value_aware  # a term from the probabilities: the chunked kernel's blocks, else explicit weights
        if self.explicit or ctx.store is not None or (values and not self.lazy_bias):
            probs = self.probabilities(q, k, ctx)
            if ctx.store is not None:
                ctx.store.append(probs)
            weights = nn.functional.dropout(probs, dropout).to(v.dtype)
            out = weights @ repeat_kv(v, q.shape[1] // v.shape[1])
            term = ctx.positional.value_term(weights, ctx.q_pos, ctx.k_pos) if values else None
            return out if term is None else out + term.to(out.dtype)
        if self.lazy_bias:  # positional terms per block, the query-aware one included
            return self.kernel(
                q, k, v, mask=ctx.mask, bias=ctx.bias, causal=ctx.causal, scale=self.scale, dropout=dropout,
                block_bias=ctx.block_bias(self.scale),
            )
        return self.kernel(q, k, v, mask=ctx.mask, bias=self.logit_bias(q, ctx), causal=ctx.causal, scale=self.scale, dropout=dropout)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        ctx: AttentionContext,
        *,
        memory: Tensor | None = None,
        cache: KVCache | CrossKVCache | None = None,
    ) -> Tensor:
        """x: (b, n, dim) -> (b, n, dim). `memory` (b, m, kv_dim) makes this cross-attention;
        `cache` holds earlier keys/values (self) or the memory's keys/values (cross)."""
        b, n, _ = x.shape
        if ctx.positional.value_aware and type(self).attend is not MultiHeadAttention.attend:
            raise ValueError(f"positional kind {type(ctx.positional).__name__} adds to the attention output a term computed from the "
                             f"probabilities, which {type(self).__name__} (its own attend) does not take; use attention kind 'mha', "
                             "or the encoding without its value term")
        q, k, v = self.qkv(x, ctx, memory=memory, cache=cache)
        out = self.transform_heads(self.attend(q, k, v, ctx), ctx)  # (b, h', n, e)
        # (b, n, h'*e), in x's dtype (a wider cache may have made the kernel work in fp32)
        out = out.transpose(1, 2).reshape(b, n, -1).to(x.dtype)
        return self.o_proj(out)


def head_dim_of(cfg: AttentionConfig, dim: int) -> int:
    """The per-head width of an attention config in a model of width `dim`."""
    return cfg.head_dim or dim // cfg.num_heads


def qk_norms(cfg: AttentionConfig, head_dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    """The configured per-head query and key norms, or (None, None)."""
    if cfg.qk_norm == "none":
        return None, None
    return NORMS.get(cfg.qk_norm)(head_dim), NORMS.get(cfg.qk_norm)(head_dim)


def mha_from_config(
    cfg: AttentionConfig, ctx: BuildContext, *, kernel: Kernel | None = None, cls: type[MultiHeadAttention] = MultiHeadAttention, **extra: object
) -> MultiHeadAttention:
    """A `cls` (MultiHeadAttention or a subclass) with the config's heads, projections, QK-norm,
    scale and dropout, around `kernel` (default: the configured exact kernel); `extra` goes to
    the constructor of `cls`."""
    head_dim = head_dim_of(cfg, ctx.dim)
    num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    q_norm, k_norm = qk_norms(cfg, head_dim)
    projs = projections(ctx.dim, cfg.num_heads, num_kv_heads, head_dim, kv_dim=ctx.kv_dim, bias=cfg.bias, out_bias=cfg.out_bias)
    return cls(
        **projs,  # type: ignore[arg-type]
        num_heads=cfg.num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kernel=kernel or KERNELS.get(cfg.kernel),
        q_norm=q_norm,
        k_norm=k_norm,
        scale=cfg.scale,
        dropout=cfg.dropout,
        **extra,
    )


@ATTENTIONS.register("mha")
def build_mha(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Standard multi-head (GQA/MQA) attention with one of the exact kernels."""
    if cfg.options:
        raise ConfigError(
            f"attention kind 'mha' takes no options, got {sorted(cfg.options)}; set them on model.attention directly"
        )
    return mha_from_config(cfg, ctx)
