"""Attention sparsity patterns as pure index arithmetic, evaluated one block at a time.

A pattern says which keys a query may attend from their indices alone. Queries are given in
key coordinates: with `n` queries over `m` keys, query i sits at index i + (m - n) (the queries
are the last n positions, as with a KV cache). Each pattern answers two questions:

- `block_state(q0, q1, k0, k1)`: for query indices [q0, q1) and key indices [k0, k1), is the
  block empty (NONE: skipped entirely), fully visible (FULL: no mask needed) or PARTIAL?
- `mask(qi, kj)`: the (bn, bm) bool mask of a block, from (bn,) and (bm,) index vectors.

Legend: `n` queries, `m` keys, `bn`/`bm` block sizes, `d = qi - kj` the query-key distance.
"""

from __future__ import annotations

import torch
from torch import Tensor

NONE, PARTIAL, FULL = 0, 1, 2


def meet(a: int, b: int) -> int:
    """Block state of the intersection of two patterns (NONE < PARTIAL < FULL)."""
    if a == NONE or b == NONE:
        return NONE
    return FULL if a == FULL and b == FULL else PARTIAL


def join(a: int, b: int) -> int:
    """Block state of the union of two patterns."""
    if a == FULL or b == FULL:
        return FULL
    return PARTIAL if a == PARTIAL or b == PARTIAL else NONE


def _distance_range(q0: int, q1: int, k0: int, k1: int) -> tuple[int, int]:
    """Smallest and largest d = qi - kj over the block."""
    return q0 - (k1 - 1), (q1 - 1) - k0


class Pattern:
    """Base class: every key visible. Subclasses narrow it down."""

    #: block sizes (queries, keys) that suit the pattern, or None for the kernel's defaults
    preferred_blocks: tuple[int, int] | None = None
    #: True when the mask depends on the distance qi - kj only, so a block's mask is the same
    #: for every block at the same diagonal offset and kernels may reuse it
    translation_invariant: bool = True
    #: True when `mask` is elementwise index arithmetic (no data-dependent Python control
    #: flow), so FlexAttention can evaluate it one (query, key) pair at a time
    elementwise: bool = True

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        return FULL

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        return torch.ones(qi.shape[0], kj.shape[0], dtype=torch.bool, device=qi.device)

    def keys_per_query(self, n: int, m: int, causal: bool) -> float:
        """The mean number of keys each of `n` queries (the last n of `m` positions) attends
        to under the pattern (and causality), counted in row blocks (never the whole n x m mask)."""
        kj = torch.arange(m)
        rows = max(1, 2**22 // max(m, 1))
        total = 0
        for q0 in range(m - n, m, rows):
            qi = torch.arange(q0, min(m, q0 + rows))
            allowed = self.mask(qi, kj)  # (rows, m)
            if causal:
                allowed = allowed & (kj[None, :] <= qi[:, None])
            total += int(allowed.sum())
        return total / max(n, 1)

    def dense(self, n: int, m: int, device: torch.device | None = None) -> Tensor:
        """The whole (n, m) bool mask for n queries that are the last n of m keys."""
        qi = torch.arange(m - n, m, device=device)
        return self.mask(qi, torch.arange(m, device=device))


class Causal(Pattern):
    """Keys at or before the query: d >= 0."""

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        dmin, dmax = _distance_range(q0, q1, k0, k1)
        return NONE if dmax < 0 else FULL if dmin >= 0 else PARTIAL

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        return kj[None, :] <= qi[:, None]


class Window(Pattern):
    """Sliding window (Beltagy et al. 2020, Longformer): keys with |d| < window. Together
    with causality this is the band window - 1 keys back plus the query itself."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.preferred_blocks = (max(128, min(window, 1024)), max(128, min(window, 1024)))

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        dmin, dmax = _distance_range(q0, q1, k0, k1)
        w = self.window
        if dmin >= w or dmax <= -w:
            return NONE
        return FULL if dmin > -w and dmax < w else PARTIAL

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        return (qi[:, None] - kj[None, :]).abs() < self.window


class Dilated(Pattern):
    """Dilated sliding window (Beltagy et al. 2020): `window` keys on each side, `dilation`
    apart: |d| < window * dilation and d divisible by dilation."""

    def __init__(self, window: int, dilation: int) -> None:
        self.window, self.dilation = window, dilation
        self.span = Window(window * dilation)
        self.preferred_blocks = self.span.preferred_blocks

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        state = self.span.block_state(q0, q1, k0, k1)
        return PARTIAL if state == FULL and self.dilation > 1 else state

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        d = qi[:, None] - kj[None, :]
        return (d.abs() < self.window * self.dilation) & (d % self.dilation == 0)


class Strided(Pattern):
    """Strided pattern of the Sparse Transformer (Child et al. 2019), both factors merged in
    one head: the previous `stride` keys (|d| < stride) and every stride-th key (d % stride == 0)."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.local = Window(stride)

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        local = self.local.block_state(q0, q1, k0, k1)
        if local == FULL:
            return FULL
        dmin, dmax = _distance_range(q0, q1, k0, k1)
        has_multiple = (dmax // self.stride) * self.stride >= dmin
        return join(local, PARTIAL if has_multiple else NONE)

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        d = qi[:, None] - kj[None, :]
        return (d.abs() < self.stride) | (d % self.stride == 0)


class Fixed(Pattern):
    """Fixed pattern of the Sparse Transformer (Child et al. 2019), both factors merged in one
    head: keys in the query's own block of `stride` (floor(i/l) == floor(j/l)) and the last
    `num_summary` keys of every block (j mod l >= l - c), which act as summaries."""

    translation_invariant = False

    def __init__(self, stride: int, num_summary: int) -> None:
        self.stride, self.num_summary = stride, num_summary

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        l, c = self.stride, self.num_summary
        same = BlockLocal(l).block_state(q0, q1, k0, k1)
        if same == FULL or c >= l:
            return FULL
        # is any key in [k0, k1) a summary column (j mod l >= l - c)?
        first_summary = (k0 // l) * l + (l - c)
        if k0 % l >= l - c:
            first_summary = k0
        return join(same, PARTIAL if first_summary < k1 else NONE)

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        l, c = self.stride, self.num_summary
        same = (qi[:, None] // l) == (kj[None, :] // l)
        return same | (kj[None, :] % l >= l - c)


class BlockLocal(Pattern):
    """Block-local attention (Parmar et al. 2018, Image Transformer; Qiu et al. 2020): the
    sequence is cut into blocks of `block` and each query attends its own block only."""

    translation_invariant = False

    def __init__(self, block: int) -> None:
        self.block = block
        self.preferred_blocks = (max(128, min(block, 1024)), max(128, min(block, 1024)))

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        B = self.block
        if (q1 - 1) // B < k0 // B or (k1 - 1) // B < q0 // B:
            return NONE
        return FULL if q0 // B == (q1 - 1) // B == k0 // B == (k1 - 1) // B else PARTIAL

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        return (qi[:, None] // self.block) == (kj[None, :] // self.block)


class LambdaShaped(Pattern):
    """Λ-shaped attention (Han et al. 2023, LM-Infinite; Xiao et al. 2023, attention sinks):
    the first `num_global` keys plus a sliding window of `window`."""

    translation_invariant = False

    def __init__(self, window: int, num_global: int) -> None:
        self.num_global = num_global
        self.local = Window(window)
        self.preferred_blocks = self.local.preferred_blocks

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        g = self.num_global
        sink = NONE if k0 >= g else FULL if k1 <= g else PARTIAL
        return join(sink, self.local.block_state(q0, q1, k0, k1))

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        return self.local.mask(qi, kj) | (kj[None, :] < self.num_global)


class BlockLayout(Pattern):
    """A block-sparse layout (Child et al. 2019; Zaheer et al. 2020, BigBird): a (nq, nk) bool
    grid saying which `block` x `block` tiles of the attention matrix are visible.

    The layout is indexed in key coordinates: tile (r, c) covers query indices [r*B, (r+1)*B)
    and keys [c*B, (c+1)*B).
    """

    translation_invariant = False
    elementwise = False  # mask() checks the layout's extent

    def __init__(self, layout: Tensor, block: int) -> None:
        if layout.dim() != 2 or layout.dtype != torch.bool:
            raise ValueError(f"block layout must be a 2-D bool tensor (query tiles, key tiles), got {tuple(layout.shape)} {layout.dtype}")
        self.layout, self.block = layout, block
        self._cpu = layout.cpu()

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        B = self.block
        tiles = self._cpu[q0 // B : (q1 - 1) // B + 1, k0 // B : (k1 - 1) // B + 1]
        if not bool(tiles.any()):
            return NONE
        return FULL if bool(tiles.all()) else PARTIAL

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        layout = self.layout.to(qi.device)
        r, c = qi // self.block, kj // self.block
        if int(r.max()) >= layout.shape[0] or int(c.max()) >= layout.shape[1]:
            raise ValueError(
                f"block layout {tuple(layout.shape)} with block {self.block} covers "
                f"{layout.shape[0] * self.block} x {layout.shape[1] * self.block} positions; the "
                f"attention needs {int(qi.max()) + 1} x {int(kj.max()) + 1}. Give a larger layout"
            )
        return layout[r[:, None], c[None, :]]


class Intersection(Pattern):
    """Keys visible under every one of `parts` (e.g. a sparse pattern and causality)."""

    def __init__(self, *parts: Pattern) -> None:
        self.parts = parts
        self.translation_invariant = all(p.translation_invariant for p in parts)
        self.elementwise = all(p.elementwise for p in parts)
        self.preferred_blocks = next((p.preferred_blocks for p in parts if p.preferred_blocks), None)

    def block_state(self, q0: int, q1: int, k0: int, k1: int) -> int:
        state = FULL
        for p in self.parts:
            state = meet(state, p.block_state(q0, q1, k0, k1))
            if state == NONE:
                break
        return state

    def mask(self, qi: Tensor, kj: Tensor) -> Tensor:
        out = self.parts[0].mask(qi, kj)
        for p in self.parts[1:]:
            out = out & p.mask(qi, kj)
        return out
