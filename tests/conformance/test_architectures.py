"""The contract of every registered architecture, tested by being registered. Its options
dataclass (if it has one) builds with its defaults and round-trips through `model.options`, an
unknown option key is refused naming the valid ones, and an architecture without options
refuses any. Built small with its default options, the model reads its own `example_inputs`
(anyformer.protocol); a few training steps on one fixed batch lower a loss on its outputs; its
weights survive the checkpoint round trip; a model that decodes gives, one token at a time
through its cache, the logits of the full forward; the FLOPs its summary states are within 10%
of torch's FLOP counter, for a forward of a bidirectional model and for decoding steps of a
generative one (a causal forward is not compared: the summary counts the causal half of the
scores, which the eager kernel computes whole); `inspect attention` gets one map per layer with
rows that sum to 1, or a clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anyformer import ConfigError, ModelConfig, build_model
from anyformer.config import from_dict, to_dict
from anyformer.models import ARCHITECTURES
from anyformer.training.checkpoint import load_weights, save_checkpoint
from anyformer.training.inspect import attention_maps

from ..helpers import flops_against_counter

NAMES = [name for name in ARCHITECTURES.names() if ARCHITECTURES.get(name).__module__.startswith("anyformer.")]
LENGTH = 32  # tokens of a token model's example input (models of images, clouds, spectrograms have their own)


def test_every_architecture_is_covered() -> None:
    assert {"decoder", "encoder", "encoder_decoder", "vit", "point_cloud", "megabyte", "ast", "pointer_generator"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_options_are_its_own(name: str) -> None:
    options = ARCHITECTURES.options_of(name)
    if options is None:
        with pytest.raises(ConfigError, match=f"architecture '{name}' takes no options"):
            _ = ModelConfig(arch=name, options={"size": 1}).arch_options
        return
    assert dataclasses.is_dataclass(options)
    defaults = dataclasses.asdict(options())
    cfg = ModelConfig(arch=name, options=defaults)
    assert cfg.arch_options == options() and from_dict(ModelConfig, to_dict(cfg)).arch_options == options()
    first = next(iter(defaults))
    with pytest.raises(ConfigError, match=rf"unknown config key 'model.options \({name}\).no_such_option'; valid keys here: {first}"):
        _ = ModelConfig(arch=name, options={"no_such_option": 1}).arch_options


def config(name: str) -> ModelConfig:
    """Small widths, the architecture's default options; a context that holds every default
    input (an AST's 1,214 patches); no positional encoding, which every architecture takes."""
    return ModelConfig(arch=name, vocab_size=40, dim=32, num_layers=2, max_seq_len=1300, ffn={"hidden_dim": 48},
                       attention={"num_heads": 4, "kernel": "eager"}, positional={"kind": "none"})


def built(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(name))


def inputs(model: torch.nn.Module, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return model.example_inputs(batch, torch.Generator().manual_seed(seed), LENGTH)


def tokens_of(model: torch.nn.Module) -> int:
    fixed = getattr(model, "tokens_per_input", None)
    return fixed() if callable(fixed) else LENGTH


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_lower_a_loss_on_its_outputs(name: str) -> None:
    """Cross-entropy of the outputs' last dimension against fixed random targets: a model whose
    parameters all reach its outputs can fit one batch."""
    model = built(name)
    x = inputs(model, batch=1)
    with torch.no_grad():
        shape = model(*x).shape
    targets = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(*x).flatten(0, -2).float(), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_through_a_checkpoint(name: str, tmp_path) -> None:
    model = built(name).eval()
    folder = save_checkpoint(tmp_path, 1, model, None, {}, {"step": 1})
    again = built(name, seed=123).eval()
    load_weights(again, folder)
    x = inputs(model, batch=2, seed=5)
    with torch.no_grad():
        assert torch.equal(model(*x), again(*x))


def decoded(model: torch.nn.Module, x: tuple[torch.Tensor, ...], start: int) -> tuple[torch.Tensor, object, torch.Tensor]:
    """(the decoded tokens, the encoded source or None, a cache holding the first `start` of them)."""
    info = model.decoding_info()
    if info.encoder_decoder:
        src, tokens = x
        source = model.encode_source(src, torch.ones_like(src, dtype=torch.bool))
    else:
        tokens, source = x[0], None
    cache = model.make_cache(tokens.shape[0])
    model.decode_step(tokens[:, :start], cache, torch.arange(start)[None].expand(tokens.shape[0], -1), source=source)
    return tokens, source, cache


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_gives_the_full_forwards_logits(name: str) -> None:
    model = built(name).eval()
    # what wrappers read to tell a generative model (LM-Infinite, the memories' checks): causal exactly when it decodes
    assert bool(getattr(model, "causal", False)) == hasattr(model, "decoding_info"), name
    if not hasattr(model, "decoding_info"):
        pytest.skip(f"{name} does not decode")
    x = inputs(model, batch=2)
    with torch.no_grad():
        full = model(*x)
        tokens, source, cache = decoded(model, x, 5)
        assert cache.next_positions(torch.ones(2, 3, dtype=torch.bool)).tolist() == [[5, 6, 7]] * 2  # the protocol's next positions
        steps = [model.decode_step(tokens[:, i : i + 1], cache, torch.full((2, 1), i), source=source) for i in range(5, LENGTH)]
    assert torch.allclose(torch.cat(steps, 1), full[:, 5:], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_summary_flops_match_the_flop_counter(name: str) -> None:
    model = built(name).eval()
    ours, measured = flops_against_counter(model, inputs(model), tokens_of(model))
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)


@pytest.mark.parametrize("name", NAMES)
def test_inspect_attention_gets_a_map_per_layer_or_says_why_not(name: str) -> None:
    model = built(name)
    x = inputs(model)
    try:
        maps = attention_maps(model, x if len(x) > 1 else x[0])
    except ValueError as e:
        assert "no maps to show" in str(e), str(e)
        return
    assert len(maps) >= config(name).num_layers
    for w in maps:
        assert w.dim() == 3 and w.shape[0] == 4
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-4)


# Settings where one term of the FLOPs count is nearly all of it, so a wrong term shows beyond
# the tolerance (at the default setting every term is a fraction and 10% hides it): the
# token mixing (a long context through narrow layers), the weights (wide layers, a short
# input), the output head (a large vocabulary through narrow layers).
TERMS = {
    "mixing": ({"dim": 8, "ffn": {"hidden_dim": 8}, "attention": {"num_heads": 2, "kernel": "eager"}}, 640),
    "weights": ({"dim": 256, "ffn": {"hidden_dim": 1024}, "attention": {"num_heads": 4, "kernel": "eager"}}, 8),
    "head": ({"dim": 16, "vocab_size": 16384, "ffn": {"hidden_dim": 16}, "attention": {"num_heads": 2, "kernel": "eager"}}, 8),
}


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("name", NAMES)
def test_each_flops_term_matches_the_counter_where_it_dominates(name: str, term: str) -> None:
    overrides, length = TERMS[term]
    cfg = dataclasses.replace(config(name), **{k: v for k, v in overrides.items() if not isinstance(v, dict)})
    for section, values in overrides.items():
        if isinstance(values, dict):
            setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = model.example_inputs(1, torch.Generator().manual_seed(0), length)
    fixed = getattr(model, "tokens_per_input", None)
    ours, measured = flops_against_counter(model, x, fixed() if callable(fixed) else length, steps=4)
    assert abs(ours - measured) <= 0.02 * measured, (term, ours, measured)
    if term in ("weights", "head") and hasattr(model, "decoding_info"):
        # a generative model's forward too: over 8 tokens the scores the summary halves under the
        # causal mask (and the eager kernel computes whole) are a fraction of a percent
        from torch.utils.flop_counter import FlopCounterMode

        from anyformer.models.summary import summarize

        n = fixed() if callable(fixed) else length
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*x)
        forward = summarize(model, seq_len=n).flops_per_token_forward
        assert abs(forward - counter.get_total_flops() / n) <= 0.02 * counter.get_total_flops() / n, (forward, counter.get_total_flops() / n)
