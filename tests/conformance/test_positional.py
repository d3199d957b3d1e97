"""The contract of every registered positional encoding, tested by being registered: a decoder
built with it trains (a few steps on a fixed batch lower the loss), decodes with its cache as it
does by recomputing, and its weights survive the checkpoint round trip; `bench attention` times
it on every exact kernel, `inspect attention` shows its causal softmax maps, and the summary's
decoding-step FLOPs are within 10% of torch's FLOP counter. An encoding that exists
only for a graph given as the attention mask is skipped here (tests/nn/positional/test_magnetic.py
holds its checks)."""

from __future__ import annotations

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.generation import generate
from anyformer.nn.positional import POSITIONALS
from anyformer.training.checkpoint import load_weights, save_checkpoint

from ..helpers import assert_storing_weights_changes_nothing, fit_losses, flops_against_counter, greedy_by_recompute, skip_if_needs_graph

KINDS = [name for name in POSITIONALS.names() if POSITIONALS.get(name).__module__.startswith("anyformer.")]


def built(kind: str, seed: int = 0, kernel: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=24, dim=32, num_layers=2, max_seq_len=48, ffn={"hidden_dim": 48},
                                   attention={"num_heads": 4, "kernel": kernel}, positional={"kind": kind}))


def test_every_kind_is_covered() -> None:
    assert {"none", "rope", "alibi", "t5", "learned", "sinusoidal"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_decoder_with_it_trains_decodes_and_reloads(kind: str, tmp_path) -> None:
    skip_if_needs_graph(kind)
    model = built(kind)
    losses = fit_losses(model)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    prompt = [3, 1, 4, 1, 5, 9, 2]
    assert generate(model, [prompt], max_new_tokens=14)[0].tolist() == greedy_by_recompute(model, prompt, 14)
    folder = save_checkpoint(tmp_path, 1, model, None, {}, {"step": 1})
    again = built(kind, seed=123).eval()
    load_weights(again, folder)
    tokens = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_bench_attention_times_it_on_every_exact_kernel(kind: str) -> None:
    """`anyformer bench attention --positional KIND` runs the exact kernels with it, forward and
    backward (the chunked kernel takes its bias per block)."""
    from anyformer.bench.attention_run import measure

    skip_if_needs_graph(kind)
    for method in ("mha[eager]", "mha[sdpa]", "mha[chunked]"):
        result = measure(dict(method=method, mode="kernel", n=32, causal=True, backward=True, positional=kind, num_heads=2,
                              head_dim=8, window=8, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1))
        assert result["time_s"] > 0 and result["runs"] == 2, (method, result)


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_attention_shows_causal_softmax_maps(kind: str) -> None:
    from anyformer.training.inspect import attention_maps

    skip_if_needs_graph(kind)
    maps = attention_maps(built(kind), torch.randint(0, 24, (1, 12), generator=torch.Generator().manual_seed(0)))
    assert len(maps) == 2
    for w in maps:
        assert w.shape == (4, 12, 12)
        assert torch.allclose(w.sum(-1), torch.ones(4, 12), atol=1e-4) and float(w.triu(1).abs().max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_flops_match_the_flop_counter(kind: str) -> None:
    """The summary's cost of a decoding step with it, within 10% of torch's FLOP counter (on the
    eager kernel: the one-query C++ decoding kernel is invisible to the counter)."""
    skip_if_needs_graph(kind)
    model = built(kind, kernel="eager").eval()
    ours, measured = flops_against_counter(model, (torch.randint(0, 24, (1, 40)),), 40)
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)


@pytest.mark.parametrize("kind", KINDS)
def test_storing_the_weights_leaves_the_outputs_unchanged(kind: str) -> None:
    skip_if_needs_graph(kind)
    tokens = torch.randint(0, 24, (2, 20), generator=torch.Generator().manual_seed(3))
    for kernel in ("eager", "sdpa", "chunked"):
        assert_storing_weights_changes_nothing(built(kind, kernel=kernel), tokens)
