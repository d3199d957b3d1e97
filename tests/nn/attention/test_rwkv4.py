"""RWKV-4 (time mixing `rwkv4`, channel mixing `rwkv4_channel`): the chunked WKV against the
recurrence and the formula written as float64 sums, whole models against transformers'
`RwkvForCausalLM` on the same weights (whole sequences, and chunks with its carried state),
its checkpoint layout read and written back, and decoding with the state against recomputation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import AttentionConfig, ConfigError, FeedForwardConfig, NormConfig, PositionalConfig
from anyformer.convert.rwkv import rwkv4_to_hf, save_rwkv4_hf
from anyformer.generation import generate
from anyformer.nn.attention.rwkv4 import RWKV4State, wkv4_chunked, wkv4_recurrent
from tests.helpers import fit_losses, greedy_by_recompute

V = 50


def model_config(**attention_options: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, dim=32, num_layers=2, max_seq_len=128,
        attention=AttentionConfig(kind="rwkv4", num_heads=1, options={"chunk_size": 8, **attention_options}),
        ffn=FeedForwardConfig(kind="rwkv4_channel", hidden_dim=64), norm=NormConfig(kind="layernorm"),
        positional=PositionalConfig(kind="none"), embed_norm=True, tie_embeddings=False,
    )


def random_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(model_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.uniform_(0, 1)
            elif name.endswith("time_decay"):
                p.uniform_(-3, 3)  # decays e^{-e^{w}} from 0.95 to 2e-9 per step
            else:
                p.copy_(torch.randn_like(p) * 0.4 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def wkv_formula(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's WKV as explicit float64 sums over i <= t, per channel."""
    b, n, d = k.shape
    out = torch.zeros(b, n, d, dtype=torch.float64)
    for t in range(n):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(k[:, i] - (t - 1 - i) * w)
            num, den = num + e * v[:, i], den + e
        out[:, t] = num / den
    return out


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_wkv_equals_the_recurrence_and_the_formula(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 23, 6
    w = torch.rand(d, generator=g, dtype=torch.float64) * 3
    u = torch.randn(d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, n, d, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    ref = wkv_formula(w, u, k, v)
    y_rec, s_rec = wkv4_recurrent(w, u, k, v)
    y, s = wkv4_chunked(w, u, k, v, chunk_size=chunk)
    torch.testing.assert_close(y_rec, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    # the states agree as the quantities they stand for: numerator and denominator e^p a, e^p b
    for a, b_ in ((s, s_rec),):
        torch.testing.assert_close(a[0] * a[2].exp(), b_[0] * b_[2].exp(), atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(a[1] * a[2].exp(), b_[1] * b_[2].exp(), atol=1e-8, rtol=1e-8)
    # a carried state: the second half after the first equals the whole sequence's second half
    _, first = wkv4_chunked(w, u, k[:, :10], v[:, :10], chunk_size=chunk)
    y2, _ = wkv4_chunked(w, u, k[:, 10:], v[:, 10:], first, chunk_size=chunk)
    torch.testing.assert_close(y2, ref[:, 10:], atol=1e-10, rtol=1e-10)


def test_large_decays_and_keys_stay_finite_in_fp32() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.full((4,), math.exp(4.0))  # e^{-55} per step
    u = torch.zeros(4)
    k = torch.randn(1, 200, 4, generator=g) * 30
    v = torch.randn(1, 200, 4, generator=g)
    y, _ = wkv4_chunked(w, u, k, v, chunk_size=64)
    y_ref, _ = wkv4_recurrent(w.double(), u.double(), k.double(), v.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)


def test_chunked_gradients_equal_the_recurrence_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    base = [torch.rand(5, generator=g, dtype=torch.float64) * 2, torch.randn(5, generator=g, dtype=torch.float64),
            torch.randn(1, 17, 5, generator=g, dtype=torch.float64), torch.randn(1, 17, 5, generator=g, dtype=torch.float64)]
    grads = []
    for form in (wkv4_recurrent, lambda *a: wkv4_chunked(*a, chunk_size=6)):
        args = [t.clone().requires_grad_(True) for t in base]
        y, _ = form(*args)
        y.square().sum().backward()
        grads.append([t.grad for t in args])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def hf_model(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    hf_cfg, sd = rwkv4_to_hf(model)
    cfg = transformers.RwkvConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    ref = transformers.RwkvForCausalLM(cfg).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


@torch.no_grad()
def test_logits_and_states_match_transformers_rwkv() -> None:
    model = random_model()
    ref = hf_model(model)
    tokens = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(3))
    want = ref(tokens).logits
    assert want.abs().max() > 1.0
    torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)
    # chunks with the state carried: transformers' use_cache state against our cache
    first = ref(tokens[:, :9], use_cache=True)
    second = ref(tokens[:, 9:], state=first.state, use_cache=True)
    cache = model.make_cache(2, 32)
    ours = torch.cat([model(tokens[:, :9], cache), model(tokens[:, 9:], cache)], 1)
    torch.testing.assert_close(ours, torch.cat([first.logits, second.logits], 1), atol=1e-4, rtol=1e-4)
    ffn_shift, attn_shift, num, den, top = second.state  # each (b, d, layers)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer.attn, RWKV4State)
        torch.testing.assert_close(layer.attn.shift.last, attn_shift[..., i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.ffn.last, ffn_shift[..., i], atol=1e-5, rtol=1e-5)
        scale = (layer.attn.top - top[..., i]).exp()  # the same sums under each one's own maximum
        torch.testing.assert_close(layer.attn.num * scale, num[..., i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.attn.den * scale, den[..., i], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_hf_directory_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anyformer import from_pretrained

    model = random_model(seed=1)
    save_rwkv4_hf(model, tmp_path / "rwkv")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "rwkv").eval()
    again = from_pretrained(tmp_path / "rwkv")
    tokens = torch.randint(0, V, (1, 15))
    torch.testing.assert_close(theirs(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name


def test_decoding_padding_and_beams_follow_recomputation() -> None:
    model = random_model(seed=2)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    assert generate(model, [prompt], max_new_tokens=8)[0].tolist() == greedy_by_recompute(model, prompt, 8)
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    tokens = torch.tensor([[0] * (6 - len(r)) + r for r in rows])
    with torch.no_grad():
        padded = model(tokens, attention_mask=tokens != 0)
        for i, row in enumerate(rows):
            torch.testing.assert_close(padded[i, 6 - len(row):], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)
        cache = model.make_cache(2, 16)
        t = torch.randint(0, V, (2, 9))
        model(t[:, :8], cache)
        swap = torch.tensor([1, 0])
        cache.reorder(swap)
        torch.testing.assert_close(model(t[swap, 8:], cache), model(t[swap])[:, 8:], atol=1e-5, rtol=1e-5)


def test_trains_and_refuses_what_it_cannot_do() -> None:
    torch.manual_seed(0)
    losses = fit_losses(build_model(model_config()), steps=20, vocab=V)
    assert losses[-1] < losses[0] - 0.5
    with pytest.raises(ConfigError, match="chunk_size must be 1-256"):
        build_model(model_config(chunk_size=0))
    cfg = model_config()
    cfg.positional.kind = "alibi"
    with pytest.raises(ConfigError, match="positional kind 'alibi'"):
        build_model(cfg)
    model = random_model()
    bad = torch.tensor([[4, 5, 0]])
    with pytest.raises(ValueError, match="left padding only"):
        model(bad, attention_mask=bad != 0)


def test_the_chunk_size_bounds_are_inclusive() -> None:
    """Chunks of 1 and of 256 tokens are allowed and compute the same model as chunks of 8;
    0 and 257 are refused."""
    model = random_model()
    tokens = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        for chunk in (1, 256):
            other = build_model(model_config(chunk_size=chunk)).eval()
            other.load_state_dict(model.state_dict())
            torch.testing.assert_close(other(tokens), want, atol=1e-5, rtol=1e-5)
    for chunk in (0, 257):
        with pytest.raises(ConfigError, match="chunk_size must be 1-256"):
            build_model(model_config(chunk_size=chunk))


def test_the_initialisation_is_transformers_rwkv_initialisation() -> None:
    """A freshly built model's decays and token-shift mixes, per layer and channel, equal what
    transformers' `RwkvForCausalLM` initialises them to (its depth-graded formulas). The bonus
    `time_first` is left out: transformers sets it to ones (`ones_like` of the intended
    log(0.3) + zigzag), while this follows the RWKV-4 reference."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_config(), num_layers=3))
    hf_cfg, ours = rwkv4_to_hf(model)
    cfg = transformers.RwkvConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    theirs = transformers.RwkvForCausalLM(cfg).state_dict()
    names = [k for k in theirs if k.split(".")[-1] in ("time_decay", "time_mix_key", "time_mix_value", "time_mix_receptance")]
    assert len(names) == 3 * (4 + 2)  # per layer: four in the time mixing, two in the channel mixing
    for name in names:
        torch.testing.assert_close(ours[name].reshape(-1), theirs[name].reshape(-1), msg=name)
