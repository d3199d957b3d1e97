"""Positional encodings that act as an additive bias on attention logits: ALiBi and T5.

Legend: `b` batch, `h` heads, `n` query length, `m` key length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import POSITIONALS, PositionalContext, PositionalEncoding


def alibi_slopes(num_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): a geometric sequence, interleaved when the
    head count is not a power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


def alibi_bias(q_pos: Tensor, k_pos: Tensor, slopes: Tensor) -> Tensor:
    """-slope * |i - j| for (b, n) and (b, m) positions and (h,) slopes -> (b, h, n, m)."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # (b, n, m)
    return -slopes.float()[None, :, None, None] * dist[:, None]


def t5_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's relative-position buckets (Raffel et al. 2020) for key minus query offsets."""
    ret = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (relative > 0).long() * num_buckets
        n = relative.abs()
    else:
        n = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


@POSITIONALS.register("alibi")
class ALiBi(PositionalEncoding):
    """Attention with linear biases (Press et al. 2022): a per-head penalty on distance."""

    relative_bias = True  # the bias depends on k_pos - q_pos only (kernels may reuse blocks)

    def __init__(self, ctx: PositionalContext, options: PositionalEncoding.Options) -> None:
        super().__init__(ctx, options)
        self.register_buffer("slopes", alibi_slopes(ctx.num_heads), persistent=False)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return alibi_bias(q_pos, k_pos, self.slopes)


@POSITIONALS.register("t5")
class T5RelativeBias(PositionalEncoding):
    """T5's learned per-head bias on bucketed relative distance, shared by all layers.

    Options: `num_buckets`, `max_distance`; the direction follows the stack (bidirectional in
    an encoder, one-sided in a causal decoder).
    """

    relative_bias = True  # the bias depends on k_pos - q_pos only (kernels may reuse blocks)

    @dataclass
    class Options:
        num_buckets: int = 32
        max_distance: int = 128

    def __init__(self, ctx: PositionalContext, options: "T5RelativeBias.Options") -> None:
        super().__init__(ctx, options)
        self.table = nn.Embedding(options.num_buckets, ctx.num_heads)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        relative = k_pos[:, None, :] - q_pos[:, :, None]  # (b, n, m)
        buckets = t5_bucket(
            relative,
            bidirectional=not self.ctx.causal,
            num_buckets=self.options.num_buckets,
            max_distance=self.options.max_distance,
        )
        return self.table(buckets).permute(0, 3, 1, 2).float()  # (b, h, n, m)
