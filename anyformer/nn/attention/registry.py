"""The registries of the attention package: exact kernels and attention kinds.

An attention kind is a factory `(AttentionConfig, BuildContext) -> nn.Module` whose module is
called as `module(x, ctx, memory=None, cache=None)` and may offer `make_cache(spec)` for a
cache of its own. A kernel is a function `(q, k, v, *, mask, bias, causal, scale, dropout) ->
out` (see kernels.py). Variant files register themselves here; the package imports every
module in it, so a new file needs no edit anywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ...registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from ...config import AttentionConfig
    from ..build_context import BuildContext

AttentionFactory = Callable[["AttentionConfig", "BuildContext"], "nn.Module"]
ATTENTIONS: Registry[AttentionFactory] = Registry("attention kind")
KERNELS: Registry[Any] = Registry("attention kernel")
