"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), self or cross.

Legend: `b` batch, `n` query length, `m` key length, `d_model` width, `h` query heads,
`g` key/value heads, `d` head dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..kv_cache import CrossKVCache, KVCache
from .context import AttentionContext
from .kernels import Kernel, attention_weights, eager_attention, repeat_kv


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over `num_heads` heads (Vaswani et al. 2017), with
    `num_kv_heads` < `num_heads` for grouped-query (Ainslie et al. 2023) or multi-query
    (Shazeer 2019) attention.

    Args:
        dim: model width of the queries' input.
        num_heads: query heads `h`.
        num_kv_heads: key/value heads `g` (divides h); default h.
        head_dim: per-head width `d`; default dim // h.
        kernel: an exact kernel from KERNELS (eager, sdpa, ...).
        kv_dim: width of the key/value input for cross-attention; default dim.
        bias: biases on the q/k/v projections; out_bias on the output projection (default: bias).
        q_norm, k_norm: optional per-head norms of queries and keys (QK-norm).
        scale: logit scale; default d ** -0.5.
        dropout: attention-probability dropout in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kernel: Kernel = eager_attention,
        kv_dim: int | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        scale: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.kernel = kernel
        # kernels with `lazy_bias` take positional biases per block instead of a dense tensor
        self.lazy_bias = bool(getattr(kernel, "lazy_bias", False))
        self.probs_fn = getattr(kernel, "weights", attention_weights)
        self.scale = scale
        self.dropout = dropout

    def _heads(self, x: Tensor, proj: nn.Linear, heads: int) -> Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, heads, self.head_dim).transpose(1, 2)  # (b, heads, n, d)

    def _kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        k = self.k_norm(self._heads(src, self.k_proj, self.num_kv_heads))  # (b, g, m, d)
        v = self._heads(src, self.v_proj, self.num_kv_heads)  # (b, g, m, d)
        return k, v

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
        q = self.q_norm(self._heads(x, self.q_proj, self.num_heads))  # (b, h, n, d)
        if memory is None:
            k, v = self._kv(x)
            if cache is None:
                q, k = ctx.positional.rotate(q, k, ctx.q_pos, ctx.q_pos)
            else:
                q, k, v = cache.store(q, k, v, ctx)  # k, v: (b, g, m, d) with the cached keys in front
        elif cache is not None:
            k, v = cache.get_or_compute(lambda: self._kv(memory))
        else:
            k, v = self._kv(memory)
        mask = ctx.mask
        dropout = self.dropout if self.training else 0.0
        if ctx.store is not None:
            probs = self.probs_fn(q, k, mask=mask, bias=ctx.logit_bias(), causal=ctx.causal, scale=self.scale)
            ctx.store.append(probs)
            out = nn.functional.dropout(probs, dropout).to(v.dtype) @ repeat_kv(v, self.num_heads // self.num_kv_heads)
        elif self.lazy_bias:
            out = self.kernel(
                q, k, v, mask=mask, bias=ctx.bias, causal=ctx.causal, scale=self.scale, dropout=dropout,
                block_bias=ctx.block_bias(),
            )
        else:
            out = self.kernel(q, k, v, mask=mask, bias=ctx.logit_bias(), causal=ctx.causal, scale=self.scale, dropout=dropout)
        # (b, n, h*d), in x's dtype (a wider cache may have made the kernel work in fp32)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim).to(x.dtype)
        return self.o_proj(out)
