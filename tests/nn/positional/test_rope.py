"""RoPE keeps the cos/sin tables of the last positions it saw (CPU): one computation per
forward instead of one per layer, and never a stale table when positions or settings change."""

from __future__ import annotations

import torch

from anyformer.nn.positional import rope as rope_module
from anyformer.nn.positional.rope import apply_rope, rope_angles

from tests.helpers import build


def _counting(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    plain = rope_module.rope_angles

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return plain(*args, **kwargs)

    monkeypatch.setattr(rope_module, "rope_angles", counted)
    return calls


def test_one_table_per_forward_and_cached_decoding_unchanged(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build(num_layers=4, attention__num_heads=4, max_seq_len=64).eval()
    tokens = torch.randint(0, 97, (2, 20))
    calls = _counting(monkeypatch)
    with torch.no_grad():
        full = model(tokens)
    assert len(calls) == 1  # four layers, one table
    calls.clear()
    with torch.inference_mode():
        cache = model.make_cache(2, 64)
        steps = [model.decode_step(tokens[:, t : t + 1], cache, cache.next_positions(torch.ones(2, 1, dtype=torch.bool)))
                 for t in range(20)]
    assert len(calls) == 20  # one per step, not one per layer and step
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_changed_positions_or_settings_are_never_served_a_stale_table() -> None:
    rope = build(attention__num_heads=4).positional
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)

    def want(pos: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_angles(pos, rope.rotary_dim, base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            pos = torch.arange(5)[None]
            first = rope.rotate(q, k, pos, pos)
            torch.testing.assert_close(first, want(pos, rope.options.base))
            pos.add_(7)  # the same tensor, changed in place
            torch.testing.assert_close(rope.rotate(q, k, pos, pos), want(pos, rope.options.base))
            old = rope.options.base
            rope.options.base = old * 2  # a setting changed after construction
            torch.testing.assert_close(rope.rotate(q, k, pos, pos), want(pos, old * 2))
            rope.options.base = old


def test_rotation_by_one_roll_equals_the_rotate_half_formula_bit_for_bit() -> None:
    """apply_rope swaps the halves with one roll and a half-negated sin; the formula it replaces,
    x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1), is written out here."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for d, r in ((16, 16), (16, 8), (12, 4)):  # whole head, and partial rotation (GPT-NeoX)
            x = torch.randn(2, 3, 5, d).to(dtype)
            cos, sin = rope_angles(torch.arange(5)[None].expand(2, 5) * 3, r, 10000.0)
            rot = x[..., :r].float()
            x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
            formula = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
            want = torch.cat([formula.to(dtype), x[..., r:]], dim=-1)
            got = apply_rope(x, cos, sin)
            assert got.dtype == dtype and torch.equal(got, want)
            assert torch.equal(apply_rope(x, cos, sin, signed_sin=rope_module.half_signed(sin)), want)
