"""The model-level registries: architectures, block kinds, depth wirings and output heads.

- ARCHITECTURES: `factory(cfg: ModelConfig, parts: Parts) -> nn.Module`, selected by `model.arch`;
  registered with its options dataclass (`register(name, options=...)`), which `model.options`
  is checked against (`cfg.arch_options`; a `validate(cfg)` method checks it with the rest).
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

from ..config import ModelConfig, register_migration
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


def moved_section(arch: str, section: str) -> None:
    """Configs written before `arch` owned its options kept them in `model.<section>`: move that
    mapping into `model.options` when the config is of `arch` (and gives no options of its
    own), and drop it from every other config, where it was an unused default."""

    def migrate(data: dict[str, Any]) -> None:
        old = data.pop(section, None)
        if isinstance(old, dict) and data.get("arch") == arch and not data.get("options"):
            data["options"] = old

    register_migration(ModelConfig, migrate)
