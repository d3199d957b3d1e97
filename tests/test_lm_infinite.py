"""LM-Infinite (anyformer.longcontext): the Λ-shaped mask with the distance ceiling against the
paper's formula written out pair by pair, exact equality with plain attention when the input
fits the window, cached decoding equal to full recompute, and the errors."""

from __future__ import annotations

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate
from anyformer.longcontext import LMInfiniteOptions, apply_lm_infinite, lm_infinite_attention, remove_lm_infinite
from anyformer.longcontext import lm_infinite as lm_infinite_module
from anyformer.nn.positional.rope import apply_rope, rope_angles

from .helpers import build


def _rope_at(x: torch.Tensor, pos: torch.Tensor, rope) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """x (..., d) rotated to integer positions pos (same leading shape), one vector at a time."""
    flat, p = x.reshape(-1, x.shape[-1]), pos.reshape(1, -1)
    cos, sin = rope_angles(p, rope.rotary_dim, rope.options.base)  # (1, 1, N, r)
    return apply_rope(flat[None, None], cos, sin, interleaved=rope.options.interleaved)[0, 0].reshape(x.shape)


def reference(q_raw, k_raw, v, rope, window: int, num_global: int, ceiling: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The paper's rule for every (query i, key j) pair: visible when 0 <= i - j < window or
    j < num_global (and j <= i); the logit is q_i . k_j with q_i rotated by the distance
    min(i - j, ceiling) and k_j unrotated (RoPE's logit depends on the distance only)."""
    b, h, n, d = q_raw.shape
    i = torch.arange(n)[:, None].expand(n, n)
    j = torch.arange(n)[None, :].expand(n, n)
    dist = i - j
    visible = (dist >= 0) & ((dist < window) | (j < num_global))
    clamped = dist.clamp(min=0, max=ceiling)
    groups = h // k_raw.shape[1]
    k = k_raw.repeat_interleave(groups, 1)
    vv = v.repeat_interleave(groups, 1)
    q_pairs = q_raw[:, :, :, None, :].expand(b, h, n, n, d)  # (b, h, i, j, d)
    turned = _rope_at(q_pairs, clamped[None, None].expand(b, h, n, n), rope)
    logits = (turned * k[:, :, None, :, :]).sum(-1) * d**-0.5
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    return probs @ vv


def _rope():  # type: ignore[no-untyped-def]
    return build(attention__num_heads=4).positional


@pytest.mark.parametrize("window, num_global, ceiling", [(8, 3, 8), (8, 3, 13), (5, 0, 5), (40, 2, 40)])
def test_attention_equals_the_pairwise_formula(monkeypatch, window: int, num_global: int, ceiling: int) -> None:
    monkeypatch.setattr(lm_infinite_module, "CHUNK", 16)  # several query chunks
    rope = _rope()
    b, h, g, n, d = 2, 4, 2, 40, 8
    gen = torch.Generator().manual_seed(0)
    q_raw, k_raw, v = (torch.randn(b, c, n, d, generator=gen) for c in (h, g, g))
    pos = torch.arange(n)[None].expand(b, n)
    q, k = rope.rotate(q_raw, k_raw, pos, pos)
    got = lm_infinite_attention(q, k, v, pos, pos, rope, LMInfiniteOptions(window, num_global, ceiling))
    torch.testing.assert_close(got, reference(q_raw, k_raw, v, rope, window, num_global, ceiling), atol=1e-5, rtol=1e-4)


def test_distances_never_exceed_the_ceiling() -> None:
    """Moving the global keys further back (a longer gap before the window) changes nothing
    once their distance is past the ceiling: the query sees them at the ceiling."""
    rope = _rope()
    gen = torch.Generator().manual_seed(1)
    d, window, ceiling, G = 8, 4, 6, 2
    q_raw, k_raw, v = (torch.randn(1, 1, 1, d, generator=gen) for _ in range(3))
    k_glob, v_glob = torch.randn(1, 1, G, d, generator=gen), torch.randn(1, 1, G, d, generator=gen)
    k_loc, v_loc = torch.randn(1, 1, window - 1, d, generator=gen), torch.randn(1, 1, window - 1, d, generator=gen)
    outs = []
    for gap in (10, 50, 1000):  # keys: G global, `gap` filler, window - 1 local, the query
        filler = torch.randn(1, 1, gap, d, generator=gen)
        k_all = torch.cat([k_glob, filler, k_loc, k_raw], 2)
        v_all = torch.cat([v_glob, filler, v_loc, v], 2)
        m = k_all.shape[2]
        pos = torch.arange(m)[None]
        q, k = rope.rotate(q_raw, k_all, pos[:, -1:], pos)
        outs.append(lm_infinite_attention(q, k, v_all, pos[:, -1:], pos, rope, LMInfiniteOptions(window, G, ceiling)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-4)


def test_a_model_that_fits_the_window_is_unchanged_and_cached_decoding_matches() -> None:
    torch.manual_seed(0)
    model = build(attention__num_heads=4, max_seq_len=64).eval()
    tokens = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        plain = model(tokens)
        apply_lm_infinite(model, window=64, num_global=4)
        same = model(tokens)
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-4)
        remove_lm_infinite(apply_lm_infinite(model, window=8, num_global=2, ceiling=12))
        torch.testing.assert_close(model(tokens), plain)
        apply_lm_infinite(model, window=8, num_global=2, ceiling=12)
        narrow = model(tokens)
    assert not torch.allclose(narrow[:, 20:], plain[:, 20:], atol=1e-3)  # past the window it differs
    torch.testing.assert_close(narrow[:, :8], plain[:, :8], atol=1e-5, rtol=1e-4)  # inside it, it cannot
    # greedy decoding with the KV cache equals picking the argmax of a full forward each step
    prompt = tokens[0, :12]
    out = generate(model, [prompt.tolist()], max_new_tokens=20)[0]
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    assert out.tolist() == seq.tolist()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="needs a RoPE model.*'alibi'"):
        apply_lm_infinite(build(positional__kind="alibi"))
    with pytest.raises(ConfigError, match="ceiling \\(4\\) must be at least the window \\(8\\)"):
        apply_lm_infinite(build(), window=8, ceiling=4)
    with pytest.raises(ConfigError, match="window must be >= 1"):
        apply_lm_infinite(build(), window=-1)
