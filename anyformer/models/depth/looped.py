"""Looped (weight-shared) depth: the stack's blocks applied T times over with one set of
weights (Universal Transformer, Dehghani et al. 2019; looped Transformers, Giannou et al. 2023,
Yang et al. 2024).

Legend: `b` batch, `n` length, `d` width, `L` blocks in the group, `T` loops.

    x = embeddings;  for t in 0..T-1:  x = x + e_t (step embedding, optional)
                                       x = x + x_0 (input injection, optional, from the 2nd loop)
                                       x = blocks(x)
    out = final_norm(x)

`loops` is T in training; `eval_loops` (default: the same) in evaluation and decoding, so a
model trained with few loops can think longer at inference. Each application of a block keeps
its own decoding cache (T * L caches), made for the loop count of the model's mode when the
cache is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...nn.build_context import BuildContext
from ...nn.kv_cache import CacheSpec
from ..common import Stack
from ..parts import Parts
from ..registry import DEPTHS


@dataclass
class LoopedOptions:
    """loops: T in training; eval_loops: T in evaluation and decoding (None: loops);
    input_injection: add the embeddings to the input of every loop after the first (Yang et al.);
    step_embedding: add a learned vector per loop step (Universal Transformer's timestep signal)."""

    loops: int = 2
    eval_loops: int | None = None
    input_injection: bool = False
    step_embedding: bool = False


class LoopedStack(Stack):
    """The blocks applied `loops` times (training) or `eval_loops` times (evaluation).

    Args:
        blocks, final_norm: as `Stack`; dim: width of the step embeddings; options: LoopedOptions.
    """

    def __init__(self, blocks: list[nn.Module], final_norm: nn.Module | None, *, dim: int, options: LoopedOptions) -> None:
        super().__init__(blocks, final_norm)
        self.loops = options.loops
        self.eval_loops = options.eval_loops or options.loops
        self.input_injection = options.input_injection
        steps = max(self.loops, self.eval_loops)
        self.step_embed = nn.Parameter(torch.zeros(steps, dim)) if options.step_embedding else None

    def num_loops(self) -> int:
        """T for the current mode (training or evaluation)."""
        return self.loops if self.training else self.eval_loops

    def block_calls(self) -> int:
        """T * L block applications per training forward."""
        return self.loops * len(self.blocks)

    def make_caches(self, spec: CacheSpec) -> list[nn.Module]:
        """One cache per application of each block: T * L, for the current mode's T."""
        return [block.make_cache(spec) for _ in range(self.num_loops()) for block in self.blocks]

    def forward(self, x: Tensor, ctx: object, caches: list | None = None, **cross: object) -> Tensor:
        """x (b, n, d) embeddings -> (b, n, d) after T loops over the blocks and the final norm."""
        loops = self.num_loops()
        if caches is not None and len(caches) != loops * len(self.blocks):
            raise ValueError(
                f"the cache holds {len(caches)} layer caches but {loops} loops over {len(self.blocks)} blocks need "
                f"{loops * len(self.blocks)}; make the cache in the mode you decode in (model.eval() before make_cache)"
            )
        x0 = x
        i = 0
        for t in range(loops):
            if self.step_embed is not None:
                x = x + self.step_embed[t].to(x.dtype)
            if self.input_injection and t > 0:
                x = x + x0
            for block in self.blocks:
                x = self.call_block(block, i, x, ctx, caches, cross)  # type: ignore[arg-type]
                i += 1
        return self.final_norm(x)


@DEPTHS.register("looped")
def build_looped(parts: Parts, ctx: BuildContext, blocks: list[nn.Module], final_norm: nn.Module | None) -> nn.Module:
    """The configured blocks as one weight-shared group applied `loops` times."""
    opts = parts.options(LoopedOptions, parts.cfg.depth.options, "model.depth.options (looped)")
    if opts.loops < 1:
        raise ConfigError(f"model.depth.options.loops for 'looped' must be >= 1, got {opts.loops}")
    if opts.eval_loops is not None and opts.eval_loops < 1:
        raise ConfigError(f"model.depth.options.eval_loops for 'looped' must be >= 1 (or null), got {opts.eval_loops}")
    return LoopedStack(blocks, final_norm, dim=ctx.dim, options=opts)
