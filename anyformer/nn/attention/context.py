"""The per-forward information every attention layer of a stack shares.

Legend: `b` batch, `h` heads, `n` query length, `m` key length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..positional.base import NoPositional, PositionalEncoding


@dataclass
class AttentionContext:
    """Positions, masks and the positional encoding for one forward pass of a stack.

    q_pos: (b, n) positions of the queries; k_pos: (b, m) positions of all keys (cached ones
    included); mask: bool broadcastable to (b, h, n, m), True = attend; bias: a user-given
    additive float mask; causal: queries see only keys up to their own index; store: when a
    list, each attention layer appends its (b, h, n, m) weights to it; carry: values a layer
    hands to later layers of the same forward (RWKV-7's first-layer values).
    """

    q_pos: Tensor
    k_pos: Tensor
    positional: PositionalEncoding = field(default_factory=lambda: _NO_POSITIONAL)
    mask: Tensor | None = None
    bias: Tensor | None = None
    causal: bool = False
    store: list[Tensor] | None = None
    carry: dict[str, Tensor] = field(default_factory=dict)
    _logit_bias: Tensor | None = field(default=None, repr=False)
    _logit_bias_ready: bool = field(default=False, repr=False)

    def logit_bias(self) -> Tensor | None:
        """Positional bias plus the user's additive mask, computed once per forward."""
        if not self._logit_bias_ready:
            pos_bias = self.positional.bias(self.q_pos, self.k_pos)
            if pos_bias is None:
                self._logit_bias = self.bias
            elif self.bias is None:
                self._logit_bias = pos_bias
            else:
                self._logit_bias = pos_bias + self.bias
            self._logit_bias_ready = True
        return self._logit_bias

    def block_bias(self, scale: float | None = None):  # type: ignore[no-untyped-def]
        """The positional bias as a `PositionalBlockBias`, computed per block by kernels that
        declare `lazy_bias`, with the encoding's query-aware term when it has one (`scale`: the
        layer's logit scale, default head_dim ** -0.5). None when the encoding adds neither."""
        from .block_bias import PositionalBlockBias

        pos = self.positional
        if not pos.query_aware and not pos.value_aware and pos.bias(self.q_pos[:, :1], self.k_pos[:, :1]) is None:
            return None
        return PositionalBlockBias(self.positional, self.q_pos, self.k_pos, scale)


class _NoPositionalSingleton(NoPositional):
    def __init__(self) -> None:
        super().__init__(None, NoPositional.Options())  # type: ignore[arg-type]


_NO_POSITIONAL = _NoPositionalSingleton()
