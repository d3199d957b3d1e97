"""Recurrent Memory Transformer (model.memory.kind=rmt): zero memory equals the segmented plain
model, memory carries information forward and never back, gradients stop at the configured
depth, cached decoding equals the full forward across segment boundaries, padding instead of
truncation, training from a run config with exact resume, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate
from anyformer.training import Trainer

from tests.helpers import build, greedy_by_recompute
from tests.training_helpers import interrupted_copy, tiny_config


def rmt(num_memory: int = 4, segment_len: int = 8, bptt_depth=None, arch: str = "decoder", **overrides):  # type: ignore[no-untyped-def]
    return build(arch, memory__kind="rmt", memory__options={"num_memory": num_memory, "segment_len": segment_len, "bptt_depth": bptt_depth},
                 **overrides)


def test_zero_memory_is_the_plain_model_on_each_segment() -> None:
    model = rmt(num_memory=0, segment_len=8)
    tokens = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        got = model(tokens)
        plain = torch.cat([model.inner(tokens[:, s : s + 8]) for s in range(0, 21, 8)], 1)
    torch.testing.assert_close(got, plain)


def test_memory_carries_segment_k_forward_and_never_back() -> None:
    model = rmt(num_memory=4, segment_len=8)
    tokens = torch.randint(0, 97, (1, 32))
    changed = tokens.clone()
    changed[0, 11] = (tokens[0, 11] + 1) % 97  # a token of segment 1
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    diff = (a - b).abs().amax(-1)[0]  # (32,)
    assert float(diff[:11].max()) == 0.0  # segment 0 and the earlier tokens of segment 1: untouched
    assert float(diff[11]) > 1e-4  # the changed position itself
    assert float(diff[16]) > 1e-4 and float(diff[24]) > 1e-4  # the first token of later segments: only through memory
    segmented = rmt(num_memory=0, segment_len=8)
    with torch.no_grad():
        a0, b0 = segmented(tokens), segmented(changed)
    assert float((a0 - b0)[0, 16:].abs().max()) == 0.0  # without memory nothing crosses a boundary


@pytest.mark.parametrize("depth", [0, 1, 2, 3, None])
def test_gradients_reach_back_only_within_the_depth(depth) -> None:
    model = rmt(num_memory=2, segment_len=4, bptt_depth=depth).train()
    inputs: list[torch.Tensor] = []

    def keep(module, args, output):  # type: ignore[no-untyped-def]
        output.retain_grad()
        inputs.append(output)

    handle = model.inner.embed.register_forward_hook(keep)
    model(torch.randint(0, 97, (1, 20)))[:, -4:].sum().backward()  # the last of 5 segments
    handle.remove()
    reached = [x.grad is not None and float(x.grad.abs().max()) > 0 for x in inputs]
    expected = [k >= 4 - (4 if depth is None else depth) for k in range(5)]
    assert reached == expected
    learned = model.memory.grad is not None and float(model.memory.grad.abs().max()) > 0  # the initial memory enters segment 0
    assert learned == expected[0]


def test_cached_decoding_equals_the_full_forward_across_segments() -> None:
    model = rmt(num_memory=3, segment_len=8)
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2)
        parts, i = [], 0
        for size in (5, 9, 1, 1, 14):  # chunks that cross segment boundaries
            chunk = tokens[:, i : i + size]
            parts.append(model.decode_step(chunk, cache, cache.next_positions(torch.ones_like(chunk, dtype=torch.bool))))
            i += size
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    prompt = tokens[0, :6].tolist()
    out = generate(model, [prompt], max_new_tokens=30)[0].tolist()  # 36 tokens: five segments
    assert out == greedy_by_recompute(model, prompt, 30)


def test_generation_runs_past_the_inner_context() -> None:
    model = rmt(num_memory=2, segment_len=12, max_seq_len=16)
    out = generate(model, [[1, 2, 3]], max_new_tokens=100)
    assert out.shape == (1, 103)


def test_a_length_that_is_not_a_multiple_is_padded_not_truncated() -> None:
    model = rmt(num_memory=2, segment_len=8)
    tokens = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        short = model(tokens)
        longer = model(torch.cat([tokens, torch.randint(0, 97, (1, 3))], 1))  # a full second segment
    assert short.shape == (1, 13, 97)
    torch.testing.assert_close(short, longer[:, :13])  # causal: what follows cannot matter


def test_an_encoder_with_memory_gives_every_token_an_output() -> None:
    model = rmt(num_memory=2, segment_len=8, arch="encoder", head__kind="mlm")
    out = model(torch.randint(0, 97, (2, 19)))
    assert out.shape == (2, 19, 97)
    with pytest.raises(ValueError, match="generation needs a decoder"):
        generate(model, [[1, 2]], max_new_tokens=2)


def test_a_pooled_head_reads_the_last_segment_which_has_read_everything() -> None:
    """A sequence classifier over 3 segments: its logits are the last segment's pooled output.
    Changing only the first segment changes them (through the memory); changing only the last
    changes them; and they equal running the three segments with the memory by hand."""
    model = rmt(num_memory=2, segment_len=8, arch="encoder", head__kind="sequence_classification", head__num_labels=3)
    tokens = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (1, 3)
        for cut in (slice(0, 8), slice(16, 24)):
            other = tokens.clone()
            other[:, cut] = (other[:, cut] + 1) % 97
            assert not torch.allclose(model(other), logits, atol=1e-5), cut
        keep = torch.ones_like(tokens, dtype=torch.bool)
        memory, out = model.memory[None], None
        for k in range(3):
            out, memory = model._segment(tokens[:, 8 * k : 8 * (k + 1)], keep[:, 8 * k : 8 * (k + 1)], memory)
    torch.testing.assert_close(logits, out)


def test_trains_from_a_config_on_windows_longer_than_the_context_and_resumes(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--model.memory.kind=rmt", "--model.memory.options.num_memory=4",
                      "--model.memory.options.segment_len=16", "--model.memory.options.bptt_depth=2", "--train.seq_len=64")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"2 x num_memory \(30\) \+ segment_len \(8\) = 68 positions, more than model.max_seq_len=64"):
        rmt(num_memory=30, segment_len=8)
    with pytest.raises(ConfigError, match="num_memory must be >= 0"):
        rmt(num_memory=-1)
    with pytest.raises(ConfigError, match="segment_len must be >= 1"):
        rmt(segment_len=0)
    with pytest.raises(ConfigError, match="unknown memory kind 'lstm'"):
        build(memory__kind="lstm")
    with pytest.raises(ValueError, match="rolling cache"):
        rmt().make_cache(1, window=8)


@pytest.mark.parametrize("num_memory, length", [(4, 64), (8, 64), (4, 40)])
def test_the_summary_counts_flops_per_token_like_a_flop_counter(num_memory, length) -> None:
    """The summary's forward FLOPs per text token against torch's FLOP counter: every segment
    runs 2m + s positions (a short last one padded to s), so memory tokens and padding count.
    The counter counts attention over the whole segment, not its causal half, so the summary
    sits a few percent below it."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    model = rmt(num_memory=num_memory, segment_len=16, dim=64, num_layers=2, vocab_size=256, max_seq_len=64,
                attention__kernel="eager").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 256, (1, length)))
    measured = counter.get_total_flops() / length
    stated = summarize(model, seq_len=length).flops_per_token_forward
    assert 0.9 * measured <= stated <= measured
    # exactly: the counter's whole score matrices (q k^T and the weighted sum, 2 x 2 P^2 width per
    # layer and segment of P positions) less the causal half the summary leaves out
    P, segments = 16 + 2 * num_memory, math.ceil(length / 16)
    half_scores = 0.5 * 2 * 2 * P * P * 64 * 2 * segments / length
    assert abs(stated - (measured - half_scores)) <= 0.005 * measured, (stated, measured - half_scores)
