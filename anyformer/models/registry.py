"""The model-level registries: architectures, block kinds, depth wirings and output heads.

- ARCHITECTURES: `factory(cfg: ModelConfig, parts: Parts) -> nn.Module`, selected by `model.arch`.
- BLOCKS: `factory(parts: Parts, ctx: BuildContext) -> nn.Module`, selected by `model.block.kind`;
  the block is called as `block(x, ctx, cache=..., **cross)` and offers `make_cache(spec)`.
- DEPTHS: `factory(parts: Parts, ctx: BuildContext, blocks, final_norm) -> nn.Module`, selected by
  `model.depth.kind`; how block outputs combine across layers (a plain residual stream today).
  The module is called as `stack(x, ctx, caches=None, **cross)` and offers `make_caches(spec)`.
- HEADS: `factory(parts: Parts, embed) -> nn.Module`, an encoder's output head (`model.head.kind`).
- MEMORIES: `factory(model: nn.Module, cfg: ModelConfig) -> nn.Module`, segment recurrence
  wrapped around the whole built model (`model.memory.kind`; 'none' returns the model itself).

`Parts` (parts.py) builds the standard sublayers from the config, so a variant reuses every
part it does not change. Each variant file registers itself; the packages import every module.
"""

from __future__ import annotations

from typing import Any, Callable

from ..registry import Registry

ARCHITECTURES: Registry[Callable[..., Any]] = Registry("architecture")
BLOCKS: Registry[Callable[..., Any]] = Registry("block kind")
DEPTHS: Registry[Callable[..., Any]] = Registry("depth wiring")
HEADS: Registry[Callable[..., Any]] = Registry("encoder head")
MEMORIES: Registry[Callable[..., Any]] = Registry("memory kind")


@MEMORIES.register("none")
def no_memory(model: Any, cfg: Any) -> Any:
    """The model itself: one forward over the whole input."""
    return model
