"""Learnable sinusoidal positional encoding (Wang et al. 2022, "A Simple yet Effective
Learnable Positional Encoding Method for Improving Document Transformer Model"): the fixed
sinusoids of each position passed through a small learned feed-forward network, added to the
token embeddings.

Legend: `b` batch, `n` length, `d` width, `f` hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...config import ConfigError
from .absolute import sinusoidal_table
from .base import POSITIONALS, PositionalContext, PositionalEncoding


@POSITIONALS.register("learnable_sinusoidal")
class LearnableSinusoidal(PositionalEncoding):
    """x + W2 act(W1 sin(pos) + b1) + b2, with sin(pos) the (d,) sinusoids of Vaswani et al.

    Options: `hidden` width of the feed-forward (default: the model width), `base` of the
    sinusoids' frequencies.
    """

    @dataclass
    class Options:
        hidden: int | None = None
        base: float = 10000.0

    def __init__(self, ctx: PositionalContext, options: "LearnableSinusoidal.Options") -> None:
        super().__init__(ctx, options)
        hidden = options.hidden or ctx.dim
        if hidden < 1:
            raise ConfigError(f"model.positional.options.hidden for 'learnable_sinusoidal' must be >= 1, got {hidden}")
        self.ffn = nn.Sequential(nn.Linear(ctx.dim, hidden), nn.GELU(), nn.Linear(hidden, ctx.dim))

    def encoding(self, positions: Tensor) -> Tensor:
        """(b, n) positions -> (b, n, d) learned encodings, in fp32."""
        table = sinusoidal_table(positions, self.ctx.dim, self.options.base)  # (b, n, d)
        return self.ffn(table.to(self.ffn[0].weight.dtype)).float()

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.encoding(positions).to(x.dtype)
