"""Absolute encodings added to the input: sinusoidal (Vaswani et al. 2017) and learned."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import POSITIONALS, PositionalContext, PositionalEncoding


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Sinusoids for integer positions (...,) -> (..., dim): sin on even, cos on odd channels."""
    half = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(-math.log(base) * half / dim)  # (dim/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., dim/2)
    out = torch.zeros(*positions.shape, dim, device=positions.device, dtype=torch.float32)
    out[..., 0::2] = torch.sin(angles)
    out[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return out


@POSITIONALS.register("sinusoidal")
class Sinusoidal(PositionalEncoding):
    """Fixed sinusoidal encoding added to the embeddings (Vaswani et al. 2017)."""

    @dataclass
    class Options:
        base: float = 10000.0

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + sinusoidal_table(positions, x.shape[-1], self.options.base).to(x.dtype)


@POSITIONALS.register("learned")
class Learned(PositionalEncoding):
    """A learned vector per absolute position, up to `max_seq_len` (GPT-2, BERT)."""

    @dataclass
    class Options:
        offset: int = 0

    def __init__(self, ctx: PositionalContext, options: "Learned.Options") -> None:
        super().__init__(ctx, options)
        self.table = nn.Embedding(ctx.max_seq_len + options.offset, ctx.dim)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        limit = self.ctx.max_seq_len
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(positions.max())} is past max_seq_len={limit} of the learned "
                f"positional table: shorten the input to at most {limit} tokens, or build the "
                "model with a larger model.max_seq_len"
            )
        return x + self.table(positions + self.options.offset)
