"""The plain depth wiring: a residual stream through the blocks in order, then the final norm."""

from __future__ import annotations

from torch import nn

from ...nn.build_context import BuildContext
from ..common import Stack
from ..parts import Parts
from ..registry import DEPTHS


@DEPTHS.register("plain")
def build_plain(parts: Parts, ctx: BuildContext, blocks: list[nn.Module], final_norm: nn.Module | None) -> nn.Module:
    """Blocks applied one after another (each block's output feeds the next)."""
    if parts.cfg.depth.options:
        raise ValueError(f"depth wiring 'plain' takes no options, got {sorted(parts.cfg.depth.options)}")
    return Stack(blocks, final_norm)
