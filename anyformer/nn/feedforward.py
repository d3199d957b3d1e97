"""Position-wise feed-forward networks: MLP, and the gated SwiGLU / GEGLU (Shazeer 2020).

Legend: `b` batch, `n` length, `d` model width, `f` hidden width.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import FeedForwardConfig
from ..registry import Registry
from .block import maybe_dropout
from .build_context import BuildContext

FEEDFORWARDS: Registry[type["FeedForward"]] = Registry("feed-forward")

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": nn.functional.silu,
}


def hidden_size(dim: int, mult: float, hidden_dim: int | None, multiple_of: int) -> int:
    """Hidden width: `hidden_dim` if given, else `mult * dim` rounded up to `multiple_of`."""
    if hidden_dim is not None:
        return hidden_dim
    f = int(mult * dim)
    return multiple_of * math.ceil(f / multiple_of)


class FeedForward(nn.Module):
    """Base of the registered feed-forwards: `build(cfg, ctx)` is the factory the model
    builder calls; the default passes the width, hidden size, activation, bias and dropout to
    the constructor. A variant needing more (e.g. the layer index) overrides `build`."""

    def __init__(self, dim: int, hidden: int, *, activation: str | None = None, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()

    @classmethod
    def build(cls, cfg: FeedForwardConfig, ctx: BuildContext) -> "FeedForward":
        """The feed-forward of a block from the model's ffn config and the build context."""
        hidden = hidden_size(ctx.dim, cfg.hidden_mult, cfg.hidden_dim, cfg.multiple_of)
        return cls(ctx.dim, hidden, activation=cfg.activation, bias=cfg.bias, dropout=cfg.dropout)


@FEEDFORWARDS.register("mlp")
class MLP(FeedForward):
    """Two-layer MLP: down(act(up(x))) (Vaswani et al. 2017).

    Args:
        dim: model width `d`.
        hidden: hidden width `f`.
        activation: key of ACTIVATIONS.
        bias: biases on both projections.
        dropout: on the hidden activations' output.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: str | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, hidden)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation or "gelu"]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, d) -> (b, n, d)
        return maybe_dropout(self.dropout, self.down(self.act(self.up(x))))


class GatedFeedForward(FeedForward):
    """Gated linear unit feed-forward: down(act(gate(x)) * up(x)) (Shazeer 2020).

    Args:
        dim: model width `d`.
        hidden: hidden width `f`.
        activation: key of ACTIVATIONS for the gate.
        bias: biases on the projections.
        dropout: on the output.
    """

    default_activation = "silu"

    def __init__(
        self, dim: int, hidden: int, *, activation: str | None = None, bias: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__(dim, hidden)
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation or self.default_activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, d) -> (b, n, d)
        return maybe_dropout(self.dropout, self.down(self.act(self.gate(x)) * self.up(x)))


@FEEDFORWARDS.register("swiglu")
class SwiGLU(GatedFeedForward):
    """GLU feed-forward with a SiLU gate, as in PaLM and Llama."""

    default_activation = "silu"


@FEEDFORWARDS.register("geglu")
class GeGLU(GatedFeedForward):
    """GLU feed-forward with a GELU gate, as in T5 v1.1."""

    default_activation = "gelu"
