"""Additive logit biases produced one block at a time, for kernels that never hold the whole
n x m matrix (the chunked kernel): the protocol, and the bias of a positional encoding (ALiBi,
T5) computed from slices of the query and key positions.

Legend: `b` batch, `h` heads, `n` queries, `m` keys, `bn`/`bm` block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class BlockBias(Protocol):
    """An additive logit bias produced one block at a time (never the whole n x m matrix)."""

    def __call__(self, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        """The bias of queries [q0, q1) and keys [k0, k1), broadcastable to (b, h, bn, bm)."""
        ...

    def parameters(self) -> list[Tensor]:
        """Tensors the bias depends on that need gradients (e.g. a T5 bucket table)."""
        ...


def query_aware(block_bias: object) -> bool:
    """Whether a block bias also adds a term computed from the queries (`query_term(q_block,
    q0, q1, k0, k1)`, q_block (b, h, bn, d)): a relative encoding's key term, per block."""
    return bool(getattr(block_bias, "query_aware", False))


def value_aware(block_bias: object) -> bool:
    """Whether a block bias also adds to the output a term computed from the probabilities
    (`value_term(p_block, q0, q1, k0, k1)`, p_block (b, h, bn, bm) -> (b, h, bn, d))."""
    return bool(getattr(block_bias, "value_aware", False))


BIAS_CACHE_BYTES = 32 * 2**20  # reused positional-bias blocks kept per call, at most


def _consecutive(pos: Tensor) -> bool:
    """True when every row of (b, n) positions is start, start + 1, ... (no gaps)."""
    if pos.shape[1] < 2:
        return True
    return bool((pos[:, 1:] - pos[:, :-1] == 1).all())


@dataclass
class PositionalBlockBias:
    """The bias of a positional encoding (ALiBi, T5) for slices of (b, n) and (b, m) positions.

    When the encoding declares `relative_bias` (its bias depends on k_pos - q_pos only), no
    parameter needs a gradient, and the positions are consecutive with the same query-key
    offset in every row, blocks of the same shape at the same diagonal offset are equal: they
    are computed once and reused (up to `BIAS_CACHE_BYTES`)."""

    positional: torch.nn.Module
    q_pos: Tensor
    k_pos: Tensor
    scale: float | None = None  # the attention's logit scale, for a query-aware term
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _cached_bytes: int = field(default=0, init=False, repr=False)
    _reusable: bool | None = field(default=None, init=False, repr=False)

    def reusable(self) -> bool:
        """Whether blocks may be reused across the same diagonal offset (see the class doc)."""
        if self._reusable is None:
            q_pos, k_pos = self.q_pos, self.k_pos
            self._reusable = (
                bool(getattr(self.positional, "relative_bias", False))
                and not self.parameters()
                and _consecutive(q_pos)
                and _consecutive(k_pos)
                and bool((q_pos[:, :1] - k_pos[:, :1] == q_pos[:1, :1] - k_pos[:1, :1]).all())
            )
        return self._reusable

    def __call__(self, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        if not self.reusable():
            return self.positional.bias(self.q_pos[:, q0:q1], self.k_pos[:, k0:k1])
        key = (q0 - k0, q1 - q0, k1 - k0)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self.positional.bias(self.q_pos[:, q0:q1], self.k_pos[:, k0:k1])
        if out is not None and self._cached_bytes + out.numel() * out.element_size() <= BIAS_CACHE_BYTES:
            self._cache[key] = out
            self._cached_bytes += out.numel() * out.element_size()
        return out

    @property
    def query_aware(self) -> bool:
        """True when the encoding adds a term from the queries (PositionalEncoding.query_bias)."""
        return bool(getattr(self.positional, "query_aware", False))

    def query_term(self, q: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        """The query-aware term of queries [q0, q1), whose (b, h, bn, d) block is `q`, against
        keys [k0, k1): the encoding's query_bias on the position slices, broadcastable to
        (b, h, bn, bm). Never the whole n x m matrix: the chunked kernel calls it per block."""
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return self.positional.query_bias(q, self.q_pos[:, q0:q1], self.k_pos[:, k0:k1], scale)

    @property
    def value_aware(self) -> bool:
        """True when the encoding adds a term to the output (PositionalEncoding.value_term)."""
        return bool(getattr(self.positional, "value_aware", False))

    def value_term(self, p: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor | None:
        """The value term of queries [q0, q1) whose (b, h, bn, bm) weights over keys [k0, k1)
        are `p`: the encoding's value_term on the position slices, (b, h, bn, d)."""
        return self.positional.value_term(p, self.q_pos[:, q0:q1], self.k_pos[:, k0:k1])

    def parameters(self) -> list[Tensor]:
        return [p for p in self.positional.parameters() if p.requires_grad]
