"""MEGABYTE (arch megabyte): the two-level wiring against a per-byte recomputation written from
the formula, causality at byte level, cached generation equal to full recompute, padding of
lengths that are not whole patches, training from the CLI config with exact resume, errors."""

from __future__ import annotations

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate
from anyformer.training import Trainer

from tests.helpers import build, greedy_by_recompute
from tests.training_helpers import interrupted_copy, tiny_config


def megabyte(patch: int = 4, **overrides):  # type: ignore[no-untyped-def]
    return build("megabyte", vocab_size=64, max_seq_len=32, options__patch_size=patch, options__local_dim=16,
                 options__local_heads=2, **overrides)


def naive(model, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits of byte i from bytes < i, one byte at a time: the global stack over [start, patch_0,
    ..., patch_{k-1}] and the local stack over [start, bytes of patch k before i]."""
    b, t = x.shape
    p, e = model.patch, model.local_bytes.embedding_dim
    out = []
    for i in range(t):
        k, j = divmod(i, p)
        vectors = [model.global_start.expand(b, 1, -1)]
        for q in range(k):
            vectors.append(model.patch_in(model.global_bytes(x[:, q * p : (q + 1) * p]).reshape(b, 1, p * e)))
        h = model._global(torch.cat(vectors, 1))[:, -1]  # (b, D): patch k's global state
        cond = model.to_local(h).reshape(b, p, e)[:, : j + 1]
        prev = [model.local_start.expand(b, 1, e)] + [model.local_bytes(x[:, k * p + s : k * p + s + 1]) for s in range(j)]
        out.append(model._local(cond + torch.cat(prev, 1))[:, -1])
    return torch.stack(out, 1)


def test_two_levels_match_the_formula_byte_by_byte() -> None:
    model = megabyte()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.predict_bytes(x), naive(model, x), atol=1e-5, rtol=1e-4)


def test_changing_a_byte_changes_no_earlier_prediction() -> None:
    model = megabyte()
    x = torch.randint(0, 64, (1, 23))
    for t in (0, 5, 8, 22):
        y = x.clone()
        y[0, t] = (x[0, t] + 1) % 64
        with torch.no_grad():
            a, b = model(x), model(y)
        # logits[:, i] predicts byte i + 1: predictions of bytes 1..t come from logits[:, :t]
        assert torch.equal(a[:, :t], b[:, :t])
        if t < 22:
            assert float((a[:, t:] - b[:, t:]).abs().max()) > 1e-4


def test_cached_generation_equals_full_recompute() -> None:
    model = megabyte()
    x = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2)
        parts, i = [], 0
        for size in (3, 1, 6, 2, 17):  # chunks across patch boundaries
            parts.append(model.decode_step(x[:, i : i + size], cache, cache.next_positions(torch.ones(2, size, dtype=torch.bool))))
            i += size
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    prompt = x[0, :5].tolist()
    out = generate(model, [prompt], max_new_tokens=20)[0].tolist()
    assert out == greedy_by_recompute(model, prompt, 20)


def test_lengths_that_are_not_whole_patches_are_padded() -> None:
    model = megabyte()
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        short, longer = model(x), model(torch.cat([x, torch.randint(0, 64, (1, 6))], 1))
    assert short.shape == (1, 10, 64)
    torch.testing.assert_close(short, longer[:, :10])


def test_trains_on_bytes_from_a_config_and_resumes_exactly(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--model.arch=megabyte", "--data.tokenizer=byte", "--model.options.patch_size=4",
                      "--model.options.local_dim=16", "--model.options.local_heads=2")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="patch_size=5 must divide model.max_seq_len=32"):
        megabyte(patch=5)
    with pytest.raises(ConfigError, match="local_dim=16 must be a multiple of local_heads=3"):
        build("megabyte", vocab_size=64, max_seq_len=32, options__local_dim=16, options__local_heads=3)
    with pytest.raises(ValueError, match="no rolling cache"):
        megabyte().make_cache(1, window=8)


def test_the_summary_counts_flops_per_byte_like_a_flop_counter() -> None:
    """The summary's forward FLOPs per byte against torch's FLOP counter over a forward of a full
    window (which counts attention over the whole window, not its causal half: the bound is
    loose; tests/conformance/test_architectures.py compares within 2% where the weights dominate)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    model = build("megabyte", vocab_size=256, dim=64, num_layers=2, max_seq_len=256, options__patch_size=8,
                  options__local_dim=32, options__local_heads=2, attention__kernel="eager")
    x = torch.randint(0, 256, (1, 256))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    measured = counter.get_total_flops() / 256
    ours = summarize(model, seq_len=256).flops_per_token_forward
    plain = 2 * sum(p.numel() for n, p in model.named_parameters() if "bytes" not in n)  # what a per-byte count of every weight gives
    assert 0.75 * measured <= ours <= measured
    assert plain > 3 * ours  # counting the global stack per byte would overstate the work several times


def test_the_decoding_cost_of_a_patch_matches_the_counter_where_the_local_attention_counts() -> None:
    """The summary's decoding cost per byte, averaged over the last whole patch of 64 bytes, in
    layers of width 8 where the local stack's attention over the patch is nearly a third of the work:
    within 2% of torch's FLOP counter over those 64 decoding steps."""
    from tests.helpers import flops_against_counter

    model = build("megabyte", vocab_size=16, dim=8, num_layers=1, max_seq_len=512, options__patch_size=64, ffn__hidden_dim=8,
                  options__local_dim=8, options__local_heads=2, attention__kernel="eager", attention__num_heads=2).eval()
    ours, measured = flops_against_counter(model, (torch.randint(0, 16, (1, 512)),), 512, steps=64)
    assert abs(ours - measured) <= 0.02 * measured, (ours, measured)
