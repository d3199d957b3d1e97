"""What every factory is told about the place it builds for: the model's config, the layer's
index among the stack's layers, whether attention is causal or cross, and the widths.

A factory (attention kind, feed-forward, norm, block kind, depth wiring, head) receives one
`BuildContext`, so a depth-dependent variant (differential attention's lambda_init,
DenseFormer's weights) reads `ctx.layer_index` and `ctx.num_layers` with no signature change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import AttentionConfig, ModelConfig, PositionalConfig


@dataclass(frozen=True)
class BuildContext:
    """The build-time context of one sublayer.

    model: the whole model config; dim: the width of the stream the sublayer reads and writes;
    layer_index: 0-based index of the block in its stack; num_layers: blocks in that stack;
    stack: which stack ("decoder", "encoder" or "cross" for an encoder-decoder's decoder);
    causal: self-attention sees only earlier positions; cross: attention reads another
    sequence (the encoder's output) of width kv_dim (default dim).
    """

    model: ModelConfig
    dim: int
    layer_index: int = 0
    num_layers: int = 1
    stack: str = "decoder"
    causal: bool = False
    cross: bool = False
    kv_dim: int | None = None

    @staticmethod
    def of(model: ModelConfig, **fields: object) -> "BuildContext":
        """A context for `model` with its width; `fields` override the defaults."""
        fields.setdefault("dim", model.dim)
        return BuildContext(model=model, **fields)  # type: ignore[arg-type]

    @staticmethod
    def standalone(attention: AttentionConfig, *, dim: int, **fields: object) -> "BuildContext":
        """A context for building one attention layer of width `dim` outside a model (tests,
        benchmarks): a model config holding `attention`, that width and no positional encoding
        (the caller hands the layer its own through the attention context)."""
        model = ModelConfig(dim=dim, attention=attention, positional=PositionalConfig(kind="none"))
        return BuildContext(model=model, dim=dim, **fields)  # type: ignore[arg-type]

    def replace(self, **fields: object) -> "BuildContext":
        """A copy with some fields changed (e.g. cross=True for a block's cross-attention)."""
        return dataclasses.replace(self, **fields)  # type: ignore[arg-type]
