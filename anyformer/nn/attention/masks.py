"""Attention masks as pure functions. Boolean masks are True where a query may attend.

Legend: `b` batch, `h` heads, `n` query length, `m` key length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(n: int, m: int, device: torch.device | None = None) -> Tensor:
    """(n, m) bool: query i (the last n of m positions) sees keys j <= i + (m - n)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


def padding_mask(keep: Tensor) -> Tensor:
    """Key padding (b, m) with True/1 for real tokens -> (b, 1, 1, m) bool."""
    return keep.bool()[:, None, None, :]


def as_4d(mask: Tensor, b: int, h: int, n: int, m: int, name: str = "attn_mask") -> Tensor:
    """Check that `mask` broadcasts to (b, h, n, m) and view it as 4-D; raise a clear error if not."""
    if mask.dim() > 4 or mask.dim() < 2:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; expected 2 to 4 dims broadcastable to "
            f"(batch, heads, queries, keys) = ({b}, {h}, {n}, {m})"
        )
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for size, want, what in zip(m4.shape, (b, h, n, m), ("batch", "heads", "queries", "keys")):
        if size not in (1, want):
            raise ValueError(
                f"{name} has shape {tuple(mask.shape)}, which does not broadcast to (batch, heads, "
                f"queries, keys) = ({b}, {h}, {n}, {m}): its {what} size is {size}, expected 1 or {want}"
            )
    return m4


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the boolean masks that are not None (None if all are)."""
    out = None
    for mk in masks:
        if mk is not None:
            out = mk if out is None else out & mk
    return out


def split_user_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A user mask as (bool mask, additive bias): bool masks select, float masks add."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    if mask.is_floating_point():
        return None, mask
    raise ValueError(
        f"attn_mask must be bool (True = attend) or floating point (added to the logits), got {mask.dtype}"
    )
