"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from anyformer.config import ModelConfig, from_dict
from anyformer.models import build_model
from anyformer.nn.attention import ATTENTIONS

REPO = Path(__file__).resolve().parents[1]  # the repository's root (README, configs/)
FIXTURES = Path(__file__).parent / "fixtures"


def orders_itself(kind: str) -> bool:
    """True for an attention kind without query-key logits that knows the order of its tokens
    (a recurrence, e.g. rwkv7): it refuses positional kinds acting on logits, so generic tests
    build it with positional kind 'none'."""
    return kind in ATTENTIONS and getattr(ATTENTIONS.get(kind), "orders_itself", False)


def tiny_config(arch: str = "decoder", **overrides: Any) -> ModelConfig:
    """A tiny model config of the given architecture (dim 32, 2 layers, 4 heads)."""
    data: dict[str, Any] = dict(
        arch=arch, vocab_size=97, dim=32, num_layers=2, max_seq_len=64,
        attention=dict(num_heads=4), positional=dict(kind="rope"),
    )
    if orders_itself(str(overrides.get("attention__kind", "mha"))) and "positional__kind" not in overrides:
        data["positional"] = dict(kind="none")
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(ModelConfig, data).validate()


def run_model(model: torch.nn.Module, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Forward any architecture on `tokens` (the encoder-decoder uses them as source and target)."""
    if model.config.arch == "encoder_decoder":
        return model(tokens, tokens, **kwargs)
    return model(tokens, **kwargs)


def build(arch: str = "decoder", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny model with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides)).eval()


def skip_if_needs_graph(kind: str) -> None:
    """Skip positional kinds that exist only for a graph given as attn_mask (they refuse plain
    sequences and do not decode incrementally)."""
    from anyformer.nn.positional import POSITIONALS

    if getattr(POSITIONALS.get(kind), "needs_graph", False):
        pytest.skip(f"positional kind '{kind}' encodes a graph given as attn_mask; tests/nn/positional/test_magnetic.py covers it")


def reference_causal_mask(n: int, m: int) -> torch.Tensor:
    """(n, m) bool, written independently of the library: the n queries are the last n of m
    positions, and query i sees keys j <= i + (m - n)."""
    return torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n)


def fit_losses(model: torch.nn.Module, steps: int = 12, vocab: int = 24) -> list[float]:
    """Next-token losses of `steps` Adam steps (lr 3e-3) of a decoder on one fixed batch of
    (4, 20) random tokens below `vocab`: a model that learns lowers them."""
    tokens = torch.randint(0, vocab, (4, 20), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def assert_decoding_in_chunks_equals_forward(model: torch.nn.Module, tokens: torch.Tensor, sizes: tuple[int, ...]) -> None:
    """decode_step over `tokens` (b, n) in chunks of `sizes` (summing to n) from a fresh cache
    gives the full forward's logits, and greedy generation from a prompt of 5 tokens of the first
    row equals greedy decoding by recomputation."""
    from anyformer.generation import generate

    assert sum(sizes) == tokens.shape[1]
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(tokens.shape[0])
        parts, i = [], 0
        for size in sizes:
            chunk = tokens[:, i : i + size]
            parts.append(model.decode_step(chunk, cache, cache.next_positions(torch.ones_like(chunk, dtype=torch.bool))))
            i += size
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    prompt = tokens[0, :5].tolist()
    assert generate(model, [prompt], max_new_tokens=20)[0].tolist() == greedy_by_recompute(model, prompt, 20)


def assert_reordered_cache_continues(model: torch.nn.Module, tokens: torch.Tensor, order: torch.Tensor, cuts: tuple[int, ...]) -> None:
    """decode_step over `tokens` (b, n) in chunks ending at `cuts`, the cache's rows reordered to
    `order` (b,) as a beam step does, then the rest in one call: its logits equal the full
    forward of the rows in that order (every layer's cache or state, and the model's, follows
    the rows)."""
    with torch.no_grad():
        cache = model.make_cache(tokens.shape[0])
        start = 0
        for end in cuts:
            chunk = tokens[:, start:end]
            model.decode_step(chunk, cache, cache.next_positions(torch.ones_like(chunk, dtype=torch.bool)))
            start = end
        cache.reorder(order)
        rest = tokens[order, start:]
        got = model.decode_step(rest, cache, cache.next_positions(torch.ones_like(rest, dtype=torch.bool)))
        want = model(tokens[order])[:, start:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def greedy_by_recompute(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without any cache: the argmax of a full forward over the whole sequence
    at every step (the reference cached generation must equal)."""
    seq = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    return seq.tolist()


def flops_against_counter(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], n: int, steps: int = 8) -> tuple[float, float]:
    """(the FLOPs per token the model summary states, torch's FlopCounterMode count) for `inputs`
    of `n` tokens: a bidirectional model's forward, or a generative model's last `steps`
    decoding steps through its cache (protocol calls only), against the summary's step cost at
    context n. A causal forward is not compared: the summary counts the causal half of the
    scores (Kaplan et al.), which the eager kernel computes whole."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    stated = summarize(model, seq_len=n)
    with torch.no_grad():
        if not hasattr(model, "decoding_info"):
            with FlopCounterMode(display=False) as counter:
                model(*inputs)
            return stated.flops_per_token_forward, counter.get_total_flops() / n
        assert stated.flops_per_token_decoding is not None, "the model decodes but its summary states no decoding cost"
        if model.decoding_info().encoder_decoder:
            src, tokens = inputs
            source = model.encode_source(src, torch.ones_like(src, dtype=torch.bool))
        else:
            tokens, source = inputs[0], None
        cache = model.make_cache(tokens.shape[0])
        model.decode_step(tokens[:, : n - steps], cache, torch.arange(n - steps)[None], source=source)
        with FlopCounterMode(display=False) as counter:
            for i in range(n - steps, n):
                model.decode_step(tokens[:, i : i + 1], cache, torch.tensor([[i]]), source=source)
        return stated.flops_per_token_decoding, counter.get_total_flops() / steps


def assert_storing_weights_changes_nothing(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """`attn_store` (what `inspect attention` reads) is a side path: the logits with it equal
    those without, in the forward pass and in a cached step after a prefix (or the cached step
    refuses the store, naming the weights it cannot give). A model whose forward takes no store
    is refused by `inspect attention` with a clear error instead."""
    import inspect

    from anyformer.training.inspect import attention_maps

    model.eval()
    if "attn_store" not in inspect.signature(model.forward).parameters:
        with pytest.raises(ValueError, match="does not hand over its attention weights"):
            attention_maps(model, tokens[:1])
        return
    with torch.no_grad():
        plain, store = model(tokens), []
        torch.testing.assert_close(model(tokens, attn_store=store), plain, rtol=0, atol=1e-5)
        steps = []
        for store in (None, []):
            cache = model.make_cache(tokens.shape[0])
            model(tokens[:, :-3], cache)
            try:
                steps.append(model(tokens[:, -3:], cache, attn_store=store))
            except ValueError as e:  # a constant-size decoding state has no weights to hand over: it must say so
                assert store is not None and "attention weights" in str(e), e
        torch.testing.assert_close(steps[0], plain[:, -3:], rtol=1e-4, atol=1e-4)  # the cached step is the forward's
        if len(steps) == 2:
            torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-5)
