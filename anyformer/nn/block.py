"""Transformer blocks built from injected sublayers, and the residual/norm placements.

Legend: `b` batch, `n` length, `d` width.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import Registry

PLACEMENTS: Registry[type[nn.Module]] = Registry("norm placement")


def maybe_dropout(dropout: nn.Dropout, x: Tensor) -> Tensor:
    """`dropout(x)`, skipping the call when it is the identity (eval mode or p = 0), which
    keeps per-token overhead out of decoding."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


@PLACEMENTS.register("pre")
class PreNorm(nn.Module):
    """x + f(norm(x)) (GPT-2, Llama)."""

    def __init__(self, sublayer: nn.Module, norm: nn.Module, *, out_norm: nn.Module | None, dropout: float) -> None:
        super().__init__()
        self.sublayer, self.norm, self.dropout = sublayer, norm, nn.Dropout(dropout)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x + maybe_dropout(self.dropout, self.sublayer(self.norm(x), *args, **kwargs))


@PLACEMENTS.register("post")
class PostNorm(nn.Module):
    """norm(x + f(x)) (the original Transformer, BERT)."""

    def __init__(self, sublayer: nn.Module, norm: nn.Module, *, out_norm: nn.Module | None, dropout: float) -> None:
        super().__init__()
        self.sublayer, self.norm, self.dropout = sublayer, norm, nn.Dropout(dropout)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.norm(x + maybe_dropout(self.dropout, self.sublayer(x, *args, **kwargs)))


@PLACEMENTS.register("sandwich")
class SandwichNorm(nn.Module):
    """x + norm_out(f(norm(x))) (CogView, Gemma 2)."""

    def __init__(self, sublayer: nn.Module, norm: nn.Module, *, out_norm: nn.Module | None, dropout: float) -> None:
        super().__init__()
        if out_norm is None:
            raise ValueError("sandwich placement needs an out_norm")
        self.sublayer, self.norm, self.out_norm, self.dropout = sublayer, norm, out_norm, nn.Dropout(dropout)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x + maybe_dropout(self.dropout, self.out_norm(self.sublayer(self.norm(x), *args, **kwargs)))


def attention_cache(attn: nn.Module, spec: Any) -> nn.Module:
    """The decoding cache of a (possibly placement-wrapped) self-attention sublayer."""
    inner = getattr(attn, "sublayer", attn)
    return inner.make_cache(spec)


def keeps_state(sublayer: nn.Module) -> bool:
    """True for a (possibly placement-wrapped) feed-forward that keeps a decoding state of its
    own (`make_cache`, e.g. RWKV's token-shifted channel mixing): it is called as
    `ffn(x, ctx, cache=state)`."""
    return callable(getattr(getattr(sublayer, "sublayer", sublayer), "make_cache", None))


class BlockCache(nn.Module):
    """A block's decoding state when its feed-forward keeps one too: the self-attention's
    cache (whose batch, max_len and device it reports) and the feed-forward's."""

    def __init__(self, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn, self.ffn = attn, ffn

    @property
    def max_len(self) -> int:
        return self.attn.max_len

    @property
    def batch(self) -> int:
        return self.attn.batch

    @property
    def device(self) -> Any:
        return self.attn.device

    def reorder(self, index: Tensor) -> None:
        self.attn.reorder(index)
        self.ffn.reorder(index)


class TransformerBlock(nn.Module):
    """Self-attention then feed-forward, each already wrapped in its residual placement. A
    feed-forward that keeps a decoding state (`keeps_state`) gets the context and its part
    of a `BlockCache`."""

    def __init__(self, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.ffn_state = keeps_state(ffn)

    def make_cache(self, spec: Any) -> nn.Module:
        """This block's decoding cache (its self-attention's, with the feed-forward's state)."""
        if self.ffn_state:
            return BlockCache(attention_cache(self.attn, spec), getattr(self.ffn, "sublayer", self.ffn).make_cache(spec))
        return attention_cache(self.attn, spec)

    def forward(self, x: Tensor, ctx: Any, *, cache: Any = None) -> Tensor:  # (b, n, d)
        if self.ffn_state:
            attn_cache, ffn_cache = (None, None) if cache is None else (cache.attn, cache.ffn)
            return self.ffn(self.attn(x, ctx, cache=attn_cache), ctx, cache=ffn_cache)
        return self.ffn(self.attn(x, ctx, cache=cache))


class CrossAttentionBlock(nn.Module):
    """Self-attention, cross-attention to an encoder's output, then feed-forward."""

    def __init__(self, attn: nn.Module, cross_attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn, self.cross_attn, self.ffn = attn, cross_attn, ffn

    def make_cache(self, spec: Any) -> nn.Module:
        """This block's self-attention decoding cache (cross-attention keeps its own)."""
        return attention_cache(self.attn, spec)

    def forward(
        self, x: Tensor, ctx: Any, *, cache: Any = None, memory: Tensor, cross_ctx: Any, cross_cache: Any = None
    ) -> Tensor:  # (b, n, d), memory (b, m, d)
        x = self.attn(x, ctx, cache=cache)
        x = self.cross_attn(x, cross_ctx, memory=memory, cache=cross_cache)
        return self.ffn(x)
