"""LM-Infinite (anyformer.longcontext): the Λ-shaped mask with the distance ceiling against the
paper's formula written out pair by pair, exact equality with plain attention when the input
fits the window, cached decoding equal to full recompute, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate
from anyformer.longcontext import LMInfiniteOptions, apply_lm_infinite, lm_infinite_attention, remove_lm_infinite
from anyformer.longcontext import lm_infinite as lm_infinite_module
from anyformer.nn.positional.rope import apply_rope, rope_angles

from tests.helpers import build, greedy_by_recompute


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


@pytest.mark.parametrize("grad", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("window, num_global, ceiling", [(8, 3, 8), (8, 3, 13), (5, 0, 5), (40, 2, 40)])
def test_attention_equals_the_pairwise_formula(monkeypatch, window: int, num_global: int, ceiling: int, grad: bool) -> None:
    """Inference runs the fused kernel; with gradients the logits are explicit: both equal the
    rule, and gradients flow to the queries, keys and values."""
    monkeypatch.setattr(lm_infinite_module, "CHUNK", 16)  # several query chunks
    rope = _rope()
    b, h, g, n, d = 2, 4, 2, 40, 8
    gen = torch.Generator().manual_seed(0)
    q_raw, k_raw, v = (torch.randn(b, c, n, d, generator=gen).requires_grad_(grad) for c in (h, g, g))
    pos = torch.arange(n)[None].expand(b, n)
    q, k = rope.rotate(q_raw, k_raw, pos, pos)
    got = lm_infinite_attention(q, k, v, pos, pos, rope, LMInfiniteOptions(window, num_global, ceiling))
    want = reference(q_raw, k_raw, v, rope, window, num_global, ceiling)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if grad:
        cot = torch.randn(got.shape, generator=gen)
        got_grads = torch.autograd.grad((got * cot).sum(), (q_raw, k_raw, v))
        want_grads = torch.autograd.grad((want * cot).sum(), (q_raw, k_raw, v))
        for a, w in zip(got_grads, want_grads):
            torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)


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
    assert out.tolist() == greedy_by_recompute(model, prompt.tolist(), 20)


def test_decoding_past_the_context_keeps_a_constant_cache_and_matches_full_recompute() -> None:
    """Past max_seq_len, generation keeps a Λ cache (the first tokens plus the last window, at
    their true positions): its size never grows, and every logit equals a full LM-Infinite
    forward over the whole sequence."""
    torch.manual_seed(1)
    model = build(attention__num_heads=4, max_seq_len=16).eval()
    apply_lm_infinite(model, window=8, num_global=2, ceiling=12)
    assert model.decoding_info().long_context.window == 8
    tokens = torch.randint(0, 97, (1, 70))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(1, window=8, sinks=2, true_positions=True)
        parts = []
        for s, e in [(0, 8), (8, 13), (13, 21), *((i, i + 1) for i in range(21, 70))]:  # chunks, then one token at a time
            keep = torch.ones(1, e - s, dtype=torch.bool)
            parts.append(model.decode_step(tokens[:, s:e], cache, cache.next_positions(keep)))
            assert cache.max_len == 2 + 2 * 8 - 1 and cache.length <= cache.max_len
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
        assert cache.positions[0, :2].tolist() == [0, 1] and cache.positions[0, cache.length - 1] == 69
    prompt = tokens[0, :30]  # longer than max_seq_len: prefilled in window-sized chunks
    out = generate(model, [prompt.tolist()], max_new_tokens=25)[0]
    assert out.tolist() == greedy_by_recompute(model, prompt.tolist(), 25)
    remove_lm_infinite(model)
    assert model.decoding_info().long_context is None
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, [prompt[:10].tolist()], max_new_tokens=25)


def test_generate_and_eval_commands_read_past_the_context(tmp_path, capsys) -> None:
    from anyformer.cli import main
    from anyformer.training import Trainer
    from anyformer.training.run import load_run

    from tests.training_helpers import tiny_config

    Trainer(tiny_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4"), run_dir=tmp_path / "run", verbose=False).fit()
    run = str(tmp_path / "run")  # RoPE, max_seq_len 32
    assert main(["generate", run, "--prompt", "KING", "--max-new-tokens", "60", "--temperature", "0", "--lm-infinite",
                 "--lm-infinite-window", "16", "--lm-infinite-global", "2"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    r = load_run(run)
    apply_lm_infinite(r.model, window=16, num_global=2)
    ids = r.tokenizer.encode("KING")
    expected = generate(r.model, [ids], max_new_tokens=60)[0, len(ids):].tolist()
    assert text == "KING" + r.tokenizer.decode(expected)

    def loss(*extra: str) -> float:
        assert main(["eval", run, "--batches", "2", *extra]) == 0
        return float(next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("loss")))

    assert loss("--seq-len", "32", "--lm-infinite") == pytest.approx(loss("--seq-len", "32"), abs=1e-4)  # fits the window
    assert math.isfinite(loss("--seq-len", "96", "--lm-infinite", "--lm-infinite-global", "4"))
    assert main(["eval", run, "--lm-infinite-window", "8"]) == 2
    assert "add --lm-infinite" in capsys.readouterr().err
    assert main(["generate", run, "--lm-infinite-global", "-1", "--lm-infinite"]) == 2
    assert "--lm-infinite-global must be at least 0" in capsys.readouterr().err


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="needs a RoPE model.*'alibi'"):
        apply_lm_infinite(build(positional__kind="alibi"))
    with pytest.raises(ConfigError, match="ceiling \\(4\\) must be at least the window \\(8\\)"):
        apply_lm_infinite(build(), window=8, ceiling=4)
    with pytest.raises(ConfigError, match="window must be >= 1"):
        apply_lm_infinite(build(), window=-1)


def test_a_whole_model_at_the_default_settings_equals_the_pairwise_formula(monkeypatch) -> None:
    """`apply_lm_infinite(model)` with nothing set (window and ceiling the trained context, 10
    global tokens) on an input 3x the context: every layer equals the paper's rule written pair
    by pair (`reference`), computed in a copy of the model whose attention is that formula on
    the unrotated queries and keys."""
    import copy

    torch.manual_seed(0)
    model = build(attention__num_heads=4, attention__num_kv_heads=2, max_seq_len=16).eval()
    reference_model = copy.deepcopy(model)
    tokens = torch.randint(0, 97, (2, 48))
    rope = reference_model.positional
    monkeypatch.setattr(rope, "rotate", lambda q, k, q_pos, k_pos: (q, k))  # the formula turns the queries itself
    for layer in reference_model.modules():
        if hasattr(layer, "attend") and hasattr(layer, "q_proj"):
            monkeypatch.setattr(layer, "attend", lambda q, k, v, ctx: reference(q, k, v, rope, window=16, num_global=10, ceiling=16))
    with torch.no_grad():
        want = reference_model(tokens)
        got = apply_lm_infinite(model)(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, remove_lm_infinite(model)(tokens)[:, :], atol=1e-3)  # and it is not plain attention


def test_without_global_tokens_a_query_one_window_away_loses_the_first_key() -> None:
    """At num_global=0 the last of 9 tokens under a window of 8 sees keys 1..8 only: its logits
    change and every earlier position's do not (the boundary where LM-Infinite starts to act)."""
    torch.manual_seed(0)
    model = build(attention__num_heads=4, max_seq_len=64).eval()
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        plain = model(tokens)
        apply_lm_infinite(model, window=8, num_global=0, ceiling=8)
        bounded = model(tokens)
    torch.testing.assert_close(bounded[:, :8], plain[:, :8], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bounded[:, 8], plain[:, 8], atol=1e-4)


def test_the_smallest_settings_are_allowed() -> None:
    LMInfiniteOptions(window=1, num_global=0, ceiling=1).check()  # a window of one: each query sees itself


@pytest.mark.parametrize("needs_grad", ["q", "k", "v"])
def test_gradients_reach_the_one_input_that_needs_them(needs_grad: str) -> None:
    """When only one of q, k, v requires gradients (a frozen model with a trainable prefix, say),
    the attention still takes the differentiable path: its value and that input's gradient
    equal the pairwise formula's."""
    rope = _rope()
    b, h, g, n, d = 1, 4, 2, 24, 8
    gen = torch.Generator().manual_seed(3)
    raw = {name: torch.randn(b, c, n, d, generator=gen).requires_grad_(name == needs_grad) for name, c in (("q", h), ("k", g), ("v", g))}
    pos = torch.arange(n)[None]
    q, k = rope.rotate(raw["q"], raw["k"], pos, pos)
    got = lm_infinite_attention(q, k, raw["v"], pos, pos, rope, LMInfiniteOptions(6, 2, 9))
    want = reference(raw["q"], raw["k"], raw["v"], rope, 6, 2, 9)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    cot = torch.randn(got.shape, generator=gen)
    (got_grad,) = torch.autograd.grad((got * cot).sum(), raw[needs_grad])
    (want_grad,) = torch.autograd.grad((want * cot).sum(), raw[needs_grad])
    torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-4)


def test_padded_or_masked_input_past_the_window_is_refused_and_within_it_is_plain_attention() -> None:
    """A padded row's Λ would begin at its padding, so past the window padded input is refused
    with the fix named; inside the window LM-Infinite is plain causal attention, padding
    included."""
    model = build(attention__num_heads=4, max_seq_len=64)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, :5] = False  # the second row is 5 tokens shorter, padded on the left
    with torch.no_grad():
        plain = model(tokens, attention_mask=pad)
        apply_lm_infinite(model, window=32, num_global=2)
        torch.testing.assert_close(model(tokens, attention_mask=pad), plain)
        remove_lm_infinite(model)
        apply_lm_infinite(model, window=8, num_global=2)
        with pytest.raises(ConfigError, match="padding.*rows of equal length"):
            model(tokens, attention_mask=pad)
        with pytest.raises(ConfigError, match="additive attention mask"):
            model(tokens, attn_mask=torch.zeros(20, 20))
        model(tokens, attention_mask=torch.ones(2, 20, dtype=torch.bool))  # no padding: no refusal


def test_a_model_that_attends_both_ways_is_refused() -> None:
    with pytest.raises(ConfigError, match="causal language models.*'encoder'"):
        apply_lm_infinite(build("encoder"))


def test_inference_on_cpu_runs_the_fused_kernel(monkeypatch) -> None:
    """The fast path is the default: without gradients on CPU every local span goes through
    PyTorch's fused flash kernel (which returns the log-sum-exp the merge needs)."""
    if lm_infinite_module._FLASH is None:
        pytest.skip("this torch has no CPU flash-attention op")
    calls = []
    real = lm_infinite_module._FLASH

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_infinite_module, "_FLASH", counted)
    monkeypatch.setattr(lm_infinite_module, "CHUNK", 16)
    rope = _rope()
    q_raw, k_raw, v = (torch.randn(1, c, 40, 8, generator=torch.Generator().manual_seed(c)) for c in (4, 2, 2))
    pos = torch.arange(40)[None]
    q, k = rope.rotate(q_raw, k_raw, pos, pos)
    got = lm_infinite_attention(q, k, v, pos, pos, rope, LMInfiniteOptions(8, 3, 8))
    assert len(calls) == 3  # one per chunk of 16 queries
    torch.testing.assert_close(got, reference(q_raw, k_raw, v, rope, 8, 3, 8), atol=1e-5, rtol=1e-4)
