"""The contract of every registered attention kind, tested by being registered: it builds in a
decoder (and in an encoder, or refuses one with a clear error); a few training steps on a fixed
batch lower the loss; greedy decoding with its cache equals recomputing the whole sequence; its
weights survive the checkpoint round trip; and the FLOPs it declares (nn/attention/cost.py)
match torch's FLOP counter on its pure-torch form (the eager kernel; sparse kinds through
their dense reference), in an encoder, where that count is exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from anyformer import ConfigError, ModelConfig, build_model
from anyformer.generation import generate
from anyformer.models.summary import summarize
from anyformer.nn.attention import ATTENTIONS
from anyformer.training.checkpoint import load_weights, save_checkpoint

from ..helpers import fit_losses, greedy_by_recompute

# the package's own kinds (tests register others into the same registry)
KINDS = [name for name in ATTENTIONS.names() if ATTENTIONS.get(name).__module__.startswith("anyformer.")]
SPARSE_OPTIONS = {"sliding_window": {"window": 6}, "dilated": {"window": 6}, "lambda_shaped": {"window": 6}, "block_local": {"block": 8},
                  "strided": {"stride": 4}, "fixed": {"stride": 4, "num_summary": 1}}


def config(kind: str, arch: str = "decoder", **attention: object) -> ModelConfig:
    options = dict(SPARSE_OPTIONS.get(kind, {}), **attention.pop("options", {}))  # type: ignore[arg-type]
    return ModelConfig(arch=arch, vocab_size=24, dim=32, num_layers=2, max_seq_len=48, ffn={"hidden_dim": 48},
                       attention={"kind": kind, "num_heads": 4, "options": options, **attention},
                       head={"kind": "mlm"} if arch == "encoder" else {})


def built(kind: str, arch: str = "decoder", **attention: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config(kind, arch, **attention))


def test_every_kind_is_covered() -> None:
    assert {"mha", "linear", "performer", "sliding_window", "differential", "selective"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_builds_in_a_decoder_and_an_encoder_or_says_why_not(kind: str) -> None:
    built(kind)
    try:
        built(kind, "encoder")
    except (ConfigError, ValueError) as e:  # a causal-only kind: the message names what to use instead
        assert "causal" in str(e) and "decoder" in str(e), str(e)


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_lower_the_loss(kind: str) -> None:
    model = built(kind)
    losses = fit_losses(model)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_decoding_equals_recompute(kind: str) -> None:
    model = built(kind).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2]
    ours = generate(model, [prompt], max_new_tokens=14)[0].tolist()
    assert ours == greedy_by_recompute(model, prompt, 14)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_round_trip_through_a_checkpoint(kind: str, tmp_path) -> None:
    model = built(kind).eval()
    folder = save_checkpoint(tmp_path, 1, model, None, {}, {"step": 1})
    torch.manual_seed(123)  # a different initialisation, replaced by the saved weights
    again = build_model(config(kind)).eval()
    load_weights(again, folder)
    tokens = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_declared_flops_match_the_flop_counter(kind: str) -> None:
    n = 48
    extra = {"options": {"dense": True}} if kind in SPARSE_OPTIONS else {}
    try:
        model = built(kind, "encoder", kernel="eager", **extra).eval()
    except (ConfigError, ValueError):
        pytest.skip(f"{kind} is causal-only: under a causal mask the eager kernel computes the whole score matrix, "
                    "while the summary counts the causal half (Kaplan et al.)")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 24, (1, n)))
    measured = counter.get_total_flops() / n
    ours = summarize(model, seq_len=n).flops_per_token_forward
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)
