"""The simplified parallel block, SAS-P (He & Hofmann 2023, "Simplifying Transformer Blocks",
arXiv 2311.01906; gains as in the authors' code, config `skipless-parallel`):

    y = skip_gain * x + attn_gain * attn(norm(x)) + ffn_gain * ffn(norm(x))

One shared pre-norm feeds both sublayers, as in the parallel block (GPT-J). The paper removes
every skip connection (skip_gain = 0): the residual path is the identity term alpha * I inside
shaped attention (attention kind 'shaped', with identity values and projection). The branch
gains beta_SA = attn_gain (1) and beta_FF = ffn_gain (0.1, the paper's O(1/sqrt(depth))
down-weighting of the MLP branch) are trainable scalars.

Pair it with `model.attention.kind=shaped`. With any other attention kind the block still runs,
but nothing then carries x through the layer: set `skip_gain: 1` (and `ffn_gain: 1`,
`trainable_gains: false` for the plain GPT-J form x + attn(norm(x)) + ffn(norm(x))).

Legend: `b` batch, `n` length, `d` width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...nn.block import attention_cache, maybe_dropout
from ...nn.build_context import BuildContext
from ..parts import Parts
from ..registry import BLOCKS


@dataclass
class SimplifiedOptions:
    """Options of block kind 'simplified'.

    skip_gain: weight of the input x in the output (paper: 0, no skip connection; 1 gives a
    parallel block); attn_gain, ffn_gain: initial weights of the attention and feed-forward
    branches (paper: 1 and 0.1); trainable_gains: learn the two branch weights (paper: yes).
    """

    skip_gain: float = 0.0
    attn_gain: float = 1.0
    ffn_gain: float = 0.1
    trainable_gains: bool = True


class SimplifiedBlock(nn.Module):
    """skip_gain * x + attn_gain * attn(norm(x)) + ffn_gain * ffn(norm(x)).

    Args:
        attn, ffn: the sublayers (unwrapped); norm: the shared input norm;
        skip_gain: fixed weight of x; attn_gain, ffn_gain: initial branch weights, scalar
        parameters when `trainable_gains`, else fixed; dropout: on each branch in training.
    """

    def __init__(
        self,
        attn: nn.Module,
        ffn: nn.Module,
        norm: nn.Module,
        *,
        skip_gain: float = 0.0,
        attn_gain: float = 1.0,
        ffn_gain: float = 0.1,
        trainable_gains: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn, self.ffn, self.norm = attn, ffn, norm
        self.skip_gain = skip_gain
        self.gain_inits = (attn_gain, ffn_gain)
        for name in ("attn_gain", "ffn_gain"):
            if trainable_gains:
                self.register_parameter(name, nn.Parameter(torch.empty(())))
            else:
                self.register_buffer(name, torch.empty(()), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """The branch gains at their initial values (called again by the model's weight init)."""
        with torch.no_grad():
            self.attn_gain.fill_(self.gain_inits[0])
            self.ffn_gain.fill_(self.gain_inits[1])

    def make_cache(self, spec: Any) -> nn.Module:
        """This block's decoding cache (its attention's)."""
        return attention_cache(self.attn, spec)

    def forward(self, x: Tensor, ctx: Any, *, cache: Any = None) -> Tensor:  # (b, n, d) -> (b, n, d)
        h = self.norm(x)
        attn = maybe_dropout(self.dropout, self.attn(h, ctx, cache=cache))
        ffn = maybe_dropout(self.dropout, self.ffn(h))
        return self.skip_gain * x + self.attn_gain.to(x.dtype) * attn + self.ffn_gain.to(x.dtype) * ffn


@BLOCKS.register("simplified")
def build_simplified(parts: Parts, ctx: BuildContext) -> nn.Module:
    """The SAS-P block: parallel attention and feed-forward on one pre-norm, no skip connection
    by default (He & Hofmann 2023); use with attention kind 'shaped'."""
    opts = parts.options(SimplifiedOptions, parts.cfg.block.options, "model.block.options (simplified)")
    parts.require_pre_norm_self_attention(ctx, "simplified")
    return SimplifiedBlock(
        parts.attention(ctx), parts.feedforward(ctx), parts.norm(),
        skip_gain=opts.skip_gain, attn_gain=opts.attn_gain, ffn_gain=opts.ffn_gain, trainable_gains=opts.trainable_gains,
        dropout=parts.cfg.dropout,
    )
