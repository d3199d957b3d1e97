"""DenseFormer depth-weighted averaging (Pagliardini et al. 2024, "DenseFormer: Enhancing
Information Flow in Transformers via Depth Weighted Averaging").

Legend: `b` batch, `n` length, `d` width, `L` blocks, `k` dilation, `p` period.

Let X_0 be the embeddings and X_t the output of block t (t = 1..L). After block t, when
t % p == 0, the next block's input is a learned weighted average of the outputs with the same
residue modulo the dilation,

    Y_t = sum_{s <= t, s = t (mod k)} alpha_{t,s} X_s,

otherwise Y_t = X_t. Block t + 1 reads Y_t; the final norm reads Y_L. Each average is
initialised to the identity (alpha_{t,t} = 1, the rest 0), so an untrained DenseFormer
computes exactly what the plain stack computes. Average t holds t // k + 1 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...nn.build_context import BuildContext
from ..common import Stack
from ..parts import Parts
from ..registry import DEPTHS


@dataclass
class DenseFormerOptions:
    """dilation k: an average reads every k-th earlier output; period p: an average after every
    p-th block only (the paper's DenseFormer k x p; 1 x 1 averages after every block over all)."""

    dilation: int = 1
    period: int = 1


def averaged_blocks(num_layers: int, period: int) -> list[int]:
    """The block numbers t (1-based) followed by an average."""
    return [t for t in range(1, num_layers + 1) if t % period == 0]


def num_weights(num_layers: int, dilation: int, period: int) -> int:
    """How many averaging weights a DenseFormer of these options holds: sum of t // k + 1 over
    the averaged blocks t."""
    return sum(t // dilation + 1 for t in averaged_blocks(num_layers, period))


class DenseFormerStack(Stack):
    """Blocks with depth-weighted averages of the embeddings and earlier block outputs.

    Args:
        blocks, final_norm: as `Stack`; dilation, period: see the module doc.
    """

    def __init__(self, blocks: list[nn.Module], final_norm: nn.Module | None, *, dilation: int, period: int) -> None:
        super().__init__(blocks, final_norm)
        self.dilation, self.period = dilation, period
        self.averaged = averaged_blocks(len(blocks), period)
        # weights[i] averages after block averaged[i]; entry j weighs output t - k * (count - 1 - j)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(t // dilation + 1)) for t in self.averaged])
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Every average the identity: weight 1 on the newest output, 0 on the others."""
        with torch.no_grad():
            for w in self.weights:
                w.zero_()
                w[-1] = 1.0

    def forward(self, x: Tensor, ctx: object, caches: list | None = None, **cross: object) -> Tensor:
        """x (b, n, d) embeddings -> (b, n, d) after the blocks, the averages and the final norm."""
        outputs = [x]  # X_0, X_1, ...: raw block outputs (the averages only feed the next block)
        which = {t: i for i, t in enumerate(self.averaged)}
        for i, block in enumerate(self.blocks):
            x = self.call_block(block, i, x, ctx, caches, cross)  # type: ignore[arg-type]
            outputs.append(x)
            t = i + 1
            if t in which:
                same = outputs[t % self.dilation :: self.dilation]  # X_s with s = t (mod k), oldest first
                w = self.weights[which[t]].to(x.dtype)
                x = torch.einsum("s,sbnd->bnd", w, torch.stack(same))  # (b, n, d)
        return self.final_norm(x)


@DEPTHS.register("denseformer")
def build_denseformer(parts: Parts, ctx: BuildContext, blocks: list[nn.Module], final_norm: nn.Module | None) -> nn.Module:
    """DenseFormer depth-weighted averaging with the configured dilation and period."""
    opts = parts.options(DenseFormerOptions, parts.cfg.depth.options, "model.depth.options (denseformer)")
    for name in ("dilation", "period"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"model.depth.options.{name} for 'denseformer' must be >= 1, got {getattr(opts, name)}")
    return DenseFormerStack(blocks, final_norm, dilation=opts.dilation, period=opts.period)
