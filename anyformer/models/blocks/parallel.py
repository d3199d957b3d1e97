"""The parallel block (GPT-J, Wang & Komatsuzaki 2021; PaLM, Chowdhery et al. 2022): attention
and feed-forward read the same normalised input and both add to the residual stream,

    y = x + attn(norm(x)) + ffn(norm'(x))

with one shared norm (GPT-J, PaLM) or one norm each (GPT-NeoX, `shared_norm: false`).

Legend: `b` batch, `n` length, `d` width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...nn.block import attention_cache, maybe_dropout
from ...nn.build_context import BuildContext
from ..parts import Parts
from ..registry import BLOCKS


@dataclass
class ParallelOptions:
    """shared_norm: one norm feeds both sublayers (GPT-J, PaLM); false: one norm each (GPT-NeoX)."""

    shared_norm: bool = True


class ParallelBlock(nn.Module):
    """x + attn(attn_norm(x)) + ffn(ffn_norm(x)); `ffn_norm` None shares `attn_norm`.

    Args:
        attn, ffn: the sublayers (unwrapped); attn_norm, ffn_norm: their input norms;
        dropout: on each sublayer's output in training.
    """

    def __init__(self, attn: nn.Module, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module | None, *, dropout: float) -> None:
        super().__init__()
        self.attn, self.ffn, self.attn_norm = attn, ffn, attn_norm
        self.ffn_norm = ffn_norm
        self.dropout = nn.Dropout(dropout)

    def make_cache(self, spec: Any) -> nn.Module:
        """This block's decoding cache (its attention's)."""
        return attention_cache(self.attn, spec)

    def forward(self, x: Tensor, ctx: Any, *, cache: Any = None) -> Tensor:  # (b, n, d) -> (b, n, d)
        h = self.attn_norm(x)
        h2 = h if self.ffn_norm is None else self.ffn_norm(x)
        return x + maybe_dropout(self.dropout, self.attn(h, ctx, cache=cache)) + maybe_dropout(self.dropout, self.ffn(h2))


@BLOCKS.register("parallel")
def build_parallel(parts: Parts, ctx: BuildContext) -> nn.Module:
    """A parallel attention + feed-forward block (pre-norm placement only)."""
    opts = parts.options(ParallelOptions, parts.cfg.block.options, "model.block.options (parallel)")
    parts.require_pre_norm_self_attention(ctx, "parallel")
    return ParallelBlock(
        parts.attention(ctx), parts.feedforward(ctx), parts.norm(), None if opts.shared_norm else parts.norm(), dropout=parts.cfg.dropout
    )
