"""Rotary position embedding (Su et al. 2021, RoFormer) on all or part of each head.

Legend: `b` batch, `h` heads, `n` length, `d` head dim, `r` rotary dims (even, <= d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import POSITIONALS, PositionalContext, PositionalEncoding


def rope_angles(positions: Tensor, rotary_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables for (b, n) positions -> each (b, 1, n, r), in fp32."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    )  # (r/2,)
    freqs = positions.float()[..., None] * inv_freq  # (b, n, r/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (b, 1, n, r)
    return emb.cos(), emb.sin()


def half_signed(sin: Tensor) -> Tensor:
    """sin (..., r) with its first half negated. With rotate_half(x1, x2) = (-x2, x1),
    rotate_half(x) * sin == x.roll(r/2) * half_signed(sin) exactly (a sign flip is exact), in
    two fewer operations per rotation."""
    h = sin.shape[-1] // 2
    return torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False, signed_sin: Tensor | None = None) -> Tensor:
    """Rotate the first r channels of x (b, h, n, d) by angles cos/sin (b, 1, n, r), in fp32.

    `interleaved` pairs channels (0,1), (2,3), ... (GPT-J); otherwise (i, i + r/2) (GPT-NeoX,
    Llama). `signed_sin` is `half_signed(sin)` when the caller keeps it (RoPE does, per forward).
    """
    r = cos.shape[-1]
    full = r == x.shape[-1]
    rot = x.float() if full else x[..., :r].float()
    if interleaved:
        pairs = rot.unflatten(-1, (-1, 2))  # (b, h, n, r/2, 2)
        c, s = cos[..., : r // 2, None], sin[..., : r // 2, None]  # (b, 1, n, r/2, 1)
        x1, x2 = pairs[..., :1], pairs[..., 1:]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:  # rot * cos + rotate_half(rot) * sin, the halves swapped by one roll
        out = rot * cos + rot.roll(r // 2, -1) * (half_signed(sin) if signed_sin is None else signed_sin)
    out = out.to(x.dtype)
    return out if full else torch.cat([out, x[..., r:]], dim=-1)


@POSITIONALS.register("rope")
class RoPE(PositionalEncoding):
    """Rotary embedding of queries and keys by their absolute positions.

    Options: `base` of the frequencies, `fraction` of each head that rotates (1.0 = all,
    0.25 as in GPT-NeoX), `interleaved` channel pairing.
    """

    @dataclass
    class Options:
        base: float = 10000.0
        fraction: float = 1.0
        interleaved: bool = False

    def __init__(self, ctx: PositionalContext, options: "RoPE.Options") -> None:
        super().__init__(ctx, options)
        r = int(ctx.head_dim * options.fraction)
        r -= r % 2
        if not 0 < r <= ctx.head_dim:
            raise ValueError(
                f"rope fraction {options.fraction} of head_dim {ctx.head_dim} leaves no rotary "
                "channels; use a fraction in (0, 1]"
            )
        self.rotary_dim = r

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """cos, sin and half_signed(sin) tables (b, 1, n, r) for (b, n) positions. Every layer
        of a forward pass rotates by the same positions (the queries', and the cached keys'
        when a cache re-rotates them), so on the CPU the tables of the last two position
        tensors are kept, with a copy of those positions, and reused for equal positions: one
        computation per forward instead of one per layer. (Elsewhere the comparison would cost
        a device sync per layer, more than the tables.)"""
        if positions.device.type != "cpu" or torch.compiler.is_compiling():
            cos, sin = rope_angles(positions, self.rotary_dim, self.options.base)
            return cos, sin, half_signed(sin)
        memo = self.__dict__.setdefault("_angles_memo", [])
        key = (self.rotary_dim, self.options.base)
        for seen_key, seen, tables in memo:
            if seen_key == key and seen.shape == positions.shape and torch.equal(seen, positions):
                return tables  # type: ignore[no-any-return]
        cos, sin = rope_angles(positions, self.rotary_dim, self.options.base)
        tables = (cos, sin, half_signed(sin))
        memo.append((key, positions.clone(), tables))
        del memo[:-2]
        return tables

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        inter = self.options.interleaved
        cos_q, sin_q, ssin_q = self.angles(q_pos)
        cos_k, sin_k, ssin_k = (cos_q, sin_q, ssin_q) if k_pos is q_pos else self.angles(k_pos)
        return (
            apply_rope(q, cos_q, sin_q, interleaved=inter, signed_sin=ssin_q),
            apply_rope(k, cos_k, sin_k, interleaved=inter, signed_sin=ssin_k),
        )
