"""The contract of every registered exact kernel, norm, feed-forward, encoder head and memory
kind, tested by being registered: a kernel equals the eager reference (causal or not, with a
padding mask, grouped heads); a model built with each norm and feed-forward trains, decodes
with its cache as it does by recomputing, and costs a decoding step what its summary states
(within 10% of torch's FLOP counter); each head gives its documented output shape; each
memory kind wraps a decoder that trains and round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.generation import generate
from anyformer.models import HEADS
from anyformer.models.registry import MEMORIES
from anyformer.nn.attention import KERNELS
from anyformer.nn.attention.kernels import eager_attention
from anyformer.nn.feedforward import FEEDFORWARDS
from anyformer.nn.norm import NORMS
from anyformer.training.checkpoint import load_weights, save_checkpoint

from ..helpers import assert_storing_weights_changes_nothing, fit_losses, flops_against_counter, greedy_by_recompute


def own(registry) -> list[str]:  # type: ignore[no-untyped-def]
    """The package's own entries (tests register others into the same registries)."""
    return [n for n in registry.names() if getattr(registry.get(n), "__module__", "anyformer.").startswith("anyformer.")]


@pytest.mark.parametrize("name", own(KERNELS))
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_equals_the_eager_reference(name: str, causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 7:] = False  # the second row's last two keys are padding
    want = eager_attention(q, k, v, mask=keep, causal=causal)
    got = KERNELS.get(name)(q, k, v, mask=keep, causal=causal)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def decoder(kernel: str = "sdpa", **sections: object) -> ModelConfig:
    return ModelConfig(vocab_size=24, dim=32, num_layers=2, max_seq_len=48, attention={"num_heads": 4, "kernel": kernel}, **sections)  # type: ignore[arg-type]


@pytest.mark.parametrize("section, name", [("norm", n) for n in own(NORMS)] + [("ffn", n) for n in own(FEEDFORWARDS)])
def test_a_decoder_with_each_norm_and_feedforward_trains_and_decodes(section: str, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(decoder(**{section: {"kind": name}}))
    # a norm-free stack starts from logits of about init_std^2 (tied embeddings, nothing rescales
    # the stream), so its loss moves later: it gets 24 steps instead of 12
    losses = fit_losses(model, steps=24 if (section, name) == ("norm", "none") else 12)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    prompt = [3, 1, 4, 1, 5]
    assert generate(model, [prompt], max_new_tokens=10)[0].tolist() == greedy_by_recompute(model, prompt, 10)
    eager = build_model(decoder("eager", **{section: {"kind": name}})).eval()  # the one-query C++ kernel is invisible to the counter
    ours, measured = flops_against_counter(eager, (torch.randint(0, 24, (1, 40)),), 40)  # the summary's decoding-step cost
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)


SHAPES = {"none": (2, 10, 32), "mlm": (2, 10, 24), "sequence_classification": (2, 3), "token_classification": (2, 10, 3),
          "embedding": (2, 32)}


@pytest.mark.parametrize("name", own(HEADS))
def test_each_head_gives_its_output_shape(name: str) -> None:
    assert name in SHAPES, f"head {name!r}: add its documented output shape to this test"
    cfg = ModelConfig(arch="encoder", vocab_size=24, dim=32, num_layers=1, max_seq_len=16, attention={"num_heads": 4},
                      head={"kind": name, "num_labels": 3})
    out = build_model(cfg)(torch.randint(0, 24, (2, 10)))
    assert tuple(out.shape) == SHAPES[name]


@pytest.mark.parametrize("name", own(MEMORIES))
def test_each_memory_kind_wraps_a_decoder_that_trains_and_reloads(name: str, tmp_path) -> None:
    options = {"none": {}, "rmt": {"segment_len": 8, "num_memory": 2}}.get(name, {"segment_len": 8})
    cfg = decoder(memory={"kind": name, "options": options})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert getattr(model, "causal", None) is True  # still a decoder to what reads the flag (LM-Infinite, memories' checks)
    losses = fit_losses(model)
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    folder = save_checkpoint(tmp_path, 1, model, None, {}, {"step": 1})
    torch.manual_seed(5)
    again = build_model(cfg).eval()
    load_weights(again, folder)
    tokens = torch.randint(0, 24, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


@pytest.mark.parametrize("name", own(MEMORIES))
def test_each_memory_kind_hands_over_weights_without_changing_outputs_or_refuses(name: str) -> None:
    options = {"none": {}, "rmt": {"segment_len": 8, "num_memory": 2}}.get(name, {"segment_len": 8})
    torch.manual_seed(0)
    model = build_model(decoder(memory={"kind": name, "options": options}))
    assert_storing_weights_changes_nothing(model, torch.randint(0, 24, (2, 20), generator=torch.Generator().manual_seed(3)))
