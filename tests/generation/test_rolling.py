"""The rolling sink + window cache (StreamingLLM) and the pure logit processors."""

from __future__ import annotations

import pytest
import torch

from anyformer.generation import generate
from anyformer.generation.logits import min_p_filter, no_repeat_ngram, repetition_penalty, top_k_filter, top_p_filter
from anyformer.generation.runner import Runner
from anyformer.generation.config import GenerationConfig
from anyformer.models.builders import build_model
from anyformer.models.presets import preset


def _model(kind: str, layers: int = 2, ctx: int = 32) -> torch.nn.Module:
    cfg = preset("llama-tiny", positional={"kind": kind}, num_layers=layers, max_seq_len=ctx)
    return build_model(cfg).eval()


@pytest.mark.parametrize("kind", ["rope", "alibi", "t5"])
def test_rolling_cache_with_a_large_window_equals_the_plain_cache(kind: str) -> None:
    model = _model(kind, ctx=64)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    plain = generate(model, prompts, max_new_tokens=20)
    rolling = generate(model, prompts, max_new_tokens=20, window=40, sink_tokens=4)
    assert torch.equal(plain, rolling)


@pytest.mark.parametrize("kind", ["rope", "alibi"])
def test_generation_runs_past_the_context_with_a_bounded_cache(kind: str) -> None:
    model = _model(kind, ctx=32)
    cfg = GenerationConfig(max_new_tokens=96, window=12, sink_tokens=4)
    runner = Runner(model, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool), cfg)
    logits = runner.prefill(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
    sizes = []
    with torch.no_grad():
        for _ in range(3 * 32):
            logits = runner.step(logits.argmax(-1)[:, None])
            sizes.append(runner.cache.length)  # type: ignore[union-attr]
            assert torch.isfinite(logits).all()
    assert max(sizes) == 16 and runner.cache.layers[0].k.shape[2] == 16  # type: ignore[union-attr]
    assert runner.cache.positions[0, :16].tolist() == list(range(16))  # type: ignore[union-attr]
    assert generate(model, [1, 2, 3], cfg).shape == (1, 99)


@pytest.mark.parametrize("kind", ["rope", "alibi"])
def test_rolling_step_equals_recomputing_the_kept_tokens(kind: str) -> None:
    # with one layer, cached keys/values depend only on their token, so attending over the kept
    # tokens (sinks + window) equals running the model on those tokens at positions 0..C-1
    model = _model(kind, layers=1, ctx=64)
    sinks, window = 3, 5
    cfg = GenerationConfig(max_new_tokens=40, window=window, sink_tokens=sinks)
    seq = torch.randint(0, 512, (1, 20))
    runner = Runner(model, seq, torch.ones_like(seq, dtype=torch.bool), cfg)
    with torch.no_grad():
        runner.prefill(seq[:, :4], torch.ones(1, 4, dtype=torch.bool))
        for t in range(4, 20):
            got = runner.step(seq[:, t : t + 1])
            kept = torch.cat([seq[:, :sinks], seq[:, max(sinks, t + 1 - window) : t + 1]], 1)
            want = model(kept)[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_model_decodes_exactly_through_a_rolling_cache_of_its_window() -> None:
    """A model whose attention sees only the last W tokens loses nothing when the cache keeps
    exactly those W (no sinks): RoPE logits depend on distances, which slot positions keep, so
    token-by-token decoding past max_seq_len equals the full forward at every position."""
    from anyformer.config import ModelConfig, from_dict

    torch.manual_seed(0)
    cfg = dict(arch="decoder", vocab_size=64, dim=32, num_layers=2, max_seq_len=64, positional=dict(kind="rope"),
               attention=dict(kind="sliding_window", num_heads=4, options=dict(window=8)))
    model = build_model(from_dict(ModelConfig, cfg).validate()).eval()
    tokens = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(1, window=8, sinks=0)
        steps = [model.decode_step(tokens[:, t : t + 1], cache, cache.next_positions(torch.ones(1, 1, dtype=torch.bool)))
                 for t in range(40)]
    assert cache.max_len == 8
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_long_prompt_is_prefilled_in_window_chunks() -> None:
    model = _model("rope", ctx=32)
    out = generate(model, list(range(1, 80)), max_new_tokens=5, window=16, sink_tokens=2)
    assert out.shape == (1, 84)


def test_top_k_top_p_min_p_against_naive_loops() -> None:
    logits = torch.randn(3, 40)
    probs = logits.softmax(-1)
    for k in (1, 5, 39):
        kept = top_k_filter(logits, k).isfinite()
        for r in range(3):
            assert set(kept[r].nonzero().flatten().tolist()) == set(logits[r].argsort(descending=True)[:k].tolist())
    for p in (0.05, 0.5, 0.9):
        kept = top_p_filter(logits, p).isfinite()
        for r in range(3):
            order = probs[r].argsort(descending=True).tolist()
            want, mass = [], 0.0
            for i in order:  # smallest prefix of the sorted tokens reaching mass p
                want.append(i)
                mass += float(probs[r, i])
                if mass >= p:
                    break
            assert set(kept[r].nonzero().flatten().tolist()) == set(want)
    for p in (0.1, 0.5):
        kept = min_p_filter(logits, p).isfinite()
        assert torch.equal(kept, probs >= p * probs.max(-1, keepdim=True).values)


def test_repetition_penalty_and_no_repeat_ngram_against_naive() -> None:
    logits = torch.randn(2, 10)
    tokens = torch.tensor([[1, 2, 2, 7], [3, 0, 4, 9]])
    keep = torch.tensor([[True] * 4, [False, True, True, True]])
    out = repetition_penalty(logits, tokens, 2.0, keep)
    for r in range(2):
        seen = {int(t) for t, k in zip(tokens[r], keep[r]) if k}
        for v in range(10):
            x = float(logits[r, v])
            want = (x / 2.0 if x > 0 else x * 2.0) if v in seen else x
            assert abs(float(out[r, v]) - want) < 1e-6
    banned = no_repeat_ngram(torch.zeros(1, 10), [[1, 2, 3, 1, 2, 5, 1, 2]], 3).isinf()[0]
    assert banned.nonzero().flatten().tolist() == [3, 5]
