"""Mixers declare their cost (anyformer/nn/attention/cost.py), and the model summary, FLOPs
budgets and `info` use it: checked against torch's FLOP counter on real forwards where the
mixing is what dominates, against a brute-force count of a pattern's mask, and for a mixer
defined outside the package that declares a constant cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anyformer import ModelConfig, build_model
from anyformer.models.summary import summarize
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.attention.patterns import Dilated, Fixed, LambdaShaped, Strided, Window

N = 512


def encoder(kind: str, **options) -> ModelConfig:  # type: ignore[no-untyped-def]
    """A 1-layer, 32-wide encoder reading N tokens: the mixing is most of its work. The eager
    kernel: torch's FLOP counter does not count the fused CPU attention."""
    return ModelConfig(arch="encoder", vocab_size=16, dim=32, num_layers=1, max_seq_len=N, positional={"kind": "none"},
                       attention={"kind": kind, "num_heads": 4, "kernel": "eager", "options": options}, ffn={"hidden_dim": 32})


@pytest.mark.parametrize("kind, options", [("mha", {}), ("linear", {}), ("performer", {"num_features": 16})])
def test_summary_flops_follow_the_mixer_against_the_flop_counter(kind: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(encoder(kind, **options)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 16, (1, N)))
    measured = counter.get_total_flops() / N
    ours = summarize(model, seq_len=N).flops_per_token_forward
    assert 0.9 * measured <= ours <= 1.1 * measured, (kind, ours, measured)


def test_a_linear_mixer_costs_the_same_at_every_length() -> None:
    short, long = (summarize(build_model(encoder("linear")), seq_len=n) for n in (64, N))
    assert short.flops_per_token_forward == long.flops_per_token_forward
    quadratic = summarize(build_model(encoder("mha")), seq_len=N).flops_per_token_forward
    assert long.flops_per_token_forward < quadratic / 2


@pytest.mark.parametrize("pattern", [Window(7), Dilated(8, 3), Strided(5), Fixed(6, 2), LambdaShaped(9, 3)], ids=repr)
@pytest.mark.parametrize("causal", [True, False])
def test_pattern_keys_per_query_counts_the_mask(pattern, causal: bool) -> None:  # type: ignore[no-untyped-def]
    n, m = 37, 53
    dense = pattern.dense(n, m)  # (n, m): queries are the last n of m positions
    if causal:
        dense = dense & (torch.arange(m)[None, :] <= torch.arange(m - n, m)[:, None])
    assert pattern.keys_per_query(n, m, causal) == pytest.approx(float(dense.sum()) / n)


def test_decoding_cost_of_one_step() -> None:
    cfg = ModelConfig(vocab_size=16, dim=32, num_layers=2, max_seq_len=N, attention={"num_heads": 4})
    s = summarize(build_model(cfg), seq_len=N)
    # a step reads all N cached-or-new keys, the forward's queries half of them on average
    assert s.flops_per_token_decoding - s.flops_per_token_forward == pytest.approx(2 * 4 * 32 * N / 2)
    window = summarize(build_model(ModelConfig(**{**cfg.__dict__, "attention": {"num_heads": 4, "kind": "sliding_window",
                                                                                "options": {"window": 16}}})), seq_len=N)
    assert window.flops_per_token_decoding == pytest.approx(s.flops_per_token_decoding - 2 * 4 * 32 * (N - 16))
    assert summarize(build_model(encoder("mha")), seq_len=N).flops_per_token_decoding is None  # an encoder does not decode


class Constant(nn.Module):
    """A mixer from outside the package: the mean of the values so far, and its declared cost."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, dim)

    def forward(self, x, ctx, *, memory=None, cache=None):  # type: ignore[no-untyped-def]
        return self.v(x).cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        return 7.0

    def step_flops(self, cached: int) -> float:
        return 5.0


def test_a_mixer_that_declares_its_cost_is_costed_as_declared() -> None:
    name = "test_constant_mixer"
    if name not in ATTENTIONS:
        ATTENTIONS.register(name)(lambda cfg, ctx: Constant(ctx.dim))
    cfg = ModelConfig(vocab_size=16, dim=32, num_layers=3, max_seq_len=N, attention={"kind": name})
    s = summarize(build_model(cfg), seq_len=N)
    weights_and_head = s.flops_per_token_forward - 3 * 7.0
    assert weights_and_head == pytest.approx(2 * s.non_embedding_parameters + 2 * 32 * 16)
    assert s.flops_per_token_decoding == pytest.approx(weights_and_head + 3 * 5.0)
