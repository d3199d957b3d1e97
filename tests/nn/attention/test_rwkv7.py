"""RWKV-7 (time mixing `rwkv7`, channel mixing `rwkv_channel`): the chunked form against the
recurrence, whole models against the official `rwkv` package's CPU path on the same weights
(whole sequences and chunks with carried state), the official checkpoint layout read and
written back, and decoding with the constant-size state against recomputation."""

from __future__ import annotations

import os

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import AttentionConfig, ConfigError, FeedForwardConfig, NormConfig, PositionalConfig
from anyformer.convert.rwkv import load_rwkv7, rwkv7_state_dict_to_official, save_rwkv7
from anyformer.generation import generate
from anyformer.nn.attention.rwkv7 import RWKV7State, rwkv7_chunked, rwkv7_recurrent
from tests.helpers import fit_losses, greedy_by_recompute

V = 50


def model_config(**attention_options: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, dim=64, num_layers=2, max_seq_len=128,
        attention=AttentionConfig(kind="rwkv7", num_heads=2, options={"chunk_size": 8, **attention_options}),
        ffn=FeedForwardConfig(kind="rwkv_channel", hidden_mult=4.0), norm=NormConfig(kind="layernorm"),
        positional=PositionalConfig(kind="none"), embed_norm=True, tie_embeddings=False,
    )


def random_model(seed: int = 0, **options: object) -> torch.nn.Module:
    """A model whose every weight is random (the reference initialisation zeroes the output
    projections, which would make every layer the identity)."""
    torch.manual_seed(seed)
    model = build_model(model_config(**options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith(("norm.weight", "ln_x.weight")) else 0.0))
    return model


def random_inputs(b: int, h: int, n: int, N: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs as the layer makes them: log-decay in (-0.607, 0), a = -kk, bb = kk * alpha."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(b, h, n, N, generator=g, dtype=dtype) for _ in range(3))
    u = -0.6065 * torch.rand(b, h, n, N, generator=g, dtype=dtype)
    kk = torch.nn.functional.normalize(torch.randn(b, h, n, N, generator=g, dtype=dtype), dim=-1)
    alpha = torch.rand(b, h, n, N, generator=g, dtype=dtype)
    state = torch.randn(b, h, N, N, generator=g, dtype=dtype)
    return r, u, k, v, -kk, kk * alpha, state


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_form_equals_the_recurrence(chunk: int) -> None:
    args = random_inputs(2, 3, 37, 8, torch.float64)
    y_ref, s_ref = rwkv7_recurrent(*args)
    y, s = rwkv7_chunked(*args, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    y32, _ = rwkv7_chunked(*(t.float() for t in args), chunk_size=chunk)  # fp32 stays close at the largest chunk
    torch.testing.assert_close(y32.double(), y_ref, atol=2e-4, rtol=2e-4)


def test_chunked_gradients_equal_the_recurrence_gradients() -> None:
    base = random_inputs(1, 2, 19, 4, torch.float64, seed=1)
    grads = []
    for form in (lambda *a: rwkv7_recurrent(*a), lambda *a: rwkv7_chunked(*a, chunk_size=6)):
        args = [t.clone().requires_grad_(True) for t in base]
        y, s = form(*args)
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in args])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module")
def rwkv_package():
    """The official `rwkv` package, RWKV-7 CPU path (imported once; its import switches off
    TorchScript autocasting, which is switched back on afterwards)."""
    env = {"RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        model_module = pytest.importorskip("rwkv.model")
    finally:
        torch._C._jit_set_autocast_mode(True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not hasattr(model_module, "RWKV_x070"):
        pytest.skip("the installed rwkv package has no RWKV-7 path")
    return model_module.RWKV_x070


def official(model: torch.nn.Module, tmp_path, rwkv_package):  # type: ignore[no-untyped-def]
    path = save_rwkv7(model, tmp_path / "model.pth")
    return rwkv_package(str(path)[: -len(".pth")], "cpu fp32")


def test_logits_match_the_official_rwkv_package(tmp_path, rwkv_package) -> None:  # type: ignore[no-untyped-def]
    model = random_model()
    ref_model = official(model, tmp_path, rwkv_package)
    ids = torch.randint(0, V, (29,), generator=torch.Generator().manual_seed(3)).tolist()
    ref, ref_state = ref_model.forward(ids, None, full_output=True)  # (29, V)
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    assert ref.abs().max() > 1.0  # the weights make a nontrivial model
    torch.testing.assert_close(full, ref, atol=2e-4, rtol=2e-4)
    # chunks with the state carried: the package's (prefix then rest) against our cache
    ref_a, state = ref_model.forward(ids[:11], None, full_output=True)
    ref_b, state = ref_model.forward(ids[11:], state, full_output=True)
    with torch.no_grad():
        cache = model.make_cache(1, 64)
        ours = torch.cat([model(torch.tensor([ids[:11]]), cache), model(torch.tensor([ids[11:]]), cache)], 1)[0]
    torch.testing.assert_close(ours, torch.cat([ref_a, ref_b]), atol=2e-4, rtol=2e-4)
    layers = list(cache.layers)
    for i, layer in enumerate(layers):  # the states themselves: [att shift, att S, ffn shift] per layer
        attn_state = layer.attn
        assert isinstance(attn_state, RWKV7State)
        torch.testing.assert_close(attn_state.S[0], state[3 * i + 1], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(attn_state.shift.last[0], state[3 * i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.ffn.last[0], state[3 * i + 2], atol=1e-5, rtol=1e-5)
    # one token at a time from the package's state and ours
    ref_step, _ = ref_model.forward([7], state)
    with torch.no_grad():
        step = model(torch.tensor([[7]]), cache)[0, -1]
    torch.testing.assert_close(step, ref_step, atol=2e-4, rtol=2e-4)


def test_official_checkpoint_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = random_model(seed=1)
    path = save_rwkv7(model, tmp_path / "out.pth")
    saved = torch.load(path, weights_only=True)
    assert saved["blocks.0.att.x_r"].shape == (1, 1, 64) and saved["blocks.0.att.r_k"].shape == (2, 32)
    assert "blocks.0.ln0.weight" in saved and "head.weight" in saved and "blocks.1.att.v0" in saved
    saved.update({"blocks.0.att.v0": torch.ones(1, 1, 64), "blocks.0.att.v1": torch.zeros(64, 32), "blocks.0.att.v2": torch.zeros(32, 64)})
    torch.save(saved, path)  # official checkpoints carry an unused value LoRA in layer 0
    again = load_rwkv7(path)
    assert again.config.attention.options["decay_rank"] == model.config.attention.options.get("decay_rank", 32)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    assert set(rwkv7_state_dict_to_official(again.state_dict())) == set(saved) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


def test_unknown_tensors_and_wrong_models_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anyformer.convert import ConversionError

    model = random_model()
    sd = rwkv7_state_dict_to_official(model.state_dict())
    torch.save({**sd, "blocks.0.att.extra": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(ConversionError, match=r"no place in the model: blocks\.0\.att\.extra"):
        load_rwkv7(tmp_path / "x.pth")
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.att.k_k"}, tmp_path / "y.pth")
    with pytest.raises(ConversionError, match=r"lacks tensors the model needs: stack\.blocks\.1\.attn\.sublayer\.k_k"):
        load_rwkv7(tmp_path / "y.pth")
    gpt = build_model(ModelConfig(vocab_size=V, dim=32, num_layers=1, attention=AttentionConfig(num_heads=2)))
    with pytest.raises(ConversionError, match="attention kind 'rwkv7'"):
        save_rwkv7(gpt, tmp_path / "z.pth")
    with pytest.raises(ValueError, match=r"\.pth file"):
        save_rwkv7(model, tmp_path / "z.bin")


def test_decoding_with_the_state_equals_full_recompute() -> None:
    model = random_model(seed=2)
    prompt = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    assert generate(model, [prompt], max_new_tokens=10)[0].tolist() == greedy_by_recompute(model, prompt, 10)


def test_left_padded_rows_equal_each_row_alone() -> None:
    model = random_model(seed=3)
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8], [9, 10, 11, 12]]
    batch = generate(model, rows, max_new_tokens=6, pad_token_id=0)
    for i, row in enumerate(rows):
        assert batch[i, -6:].tolist() == generate(model, row, max_new_tokens=6)[0, -6:].tolist()
    tokens = torch.tensor([[0] * (9 - len(r)) + r for r in rows])
    with torch.no_grad():
        padded = model(tokens, attention_mask=tokens != 0)
        for i, row in enumerate(rows):
            torch.testing.assert_close(padded[i, 9 - len(row):], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)


def test_beam_reorder_moves_the_state() -> None:
    model = random_model(seed=4)
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    swap = torch.tensor([1, 0])
    with torch.no_grad():
        cache = model.make_cache(2, 16)
        model(tokens[:, :8], cache)
        cache.reorder(swap)
        step = model(tokens[swap, 8:], cache)
        ref = model(tokens[swap])[:, 8:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_bad_settings_and_inputs_are_refused() -> None:
    model = random_model()
    tokens = torch.tensor([[1, 2, 3, 0]])
    with pytest.raises(ValueError, match="left padding only"):
        model(tokens, attention_mask=tokens != 0)
    with pytest.raises(ValueError, match="rolling"):
        model.make_cache(1, window=8)
    for chunk in (0, 65):
        with pytest.raises(ConfigError, match="chunk_size must be 1-64"):
            build_model(model_config(chunk_size=chunk))
    with pytest.raises(ConfigError, match="causal"):
        build_model(ModelConfig(arch="encoder", vocab_size=V, dim=64, num_layers=1, attention={"kind": "rwkv7", "num_heads": 2}))
    with pytest.raises(ConfigError, match="num_heads .* must equal model.dim"):
        build_model(ModelConfig(vocab_size=V, dim=64, num_layers=1, attention={"kind": "rwkv7", "num_heads": 2, "head_dim": 16}, positional={"kind": "none"}))
    with pytest.raises(ConfigError, match="bias"):
        build_model(ModelConfig(vocab_size=V, dim=64, num_layers=1, attention={"kind": "rwkv7", "num_heads": 2, "bias": True}, positional={"kind": "none"}))
    parallel = model_config()
    parallel.block.kind = "parallel"
    with pytest.raises(ConfigError, match="keeps a decoding state .* block kind 'sequential'"):
        build_model(parallel)


def test_a_tiny_model_trains_from_the_reference_initialisation() -> None:
    torch.manual_seed(0)
    losses = fit_losses(build_model(model_config()), steps=20, vocab=V)
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("chunk", [8, 64])
def test_declared_flops_match_the_flop_counter(chunk: int) -> None:
    """The summary's forward FLOPs against torch's FLOP counter (which counts the matrix
    products; the triangular solve, 2 C N per token and head, is added to its figure)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    n = 128
    model = build_model(model_config(chunk_size=chunk)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, V, (1, n)))
    solve = 2 * 2 * chunk * 32 * 2  # layers x heads x 2 C N
    measured = counter.get_total_flops() / n + solve
    ours = summarize(model, seq_len=n).flops_per_token_forward
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)


def test_positional_kinds_that_act_inside_attention_are_refused() -> None:
    cfg = model_config()
    cfg.positional.kind = "rope"
    with pytest.raises(ConfigError, match="positional kind 'rope' .* model.positional.kind=none"):
        build_model(cfg)
    cfg.positional.kind = "learned"  # added to the embeddings: the recurrence sees it
    build_model(cfg)


def test_from_pretrained_reads_an_official_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from anyformer import from_pretrained

    model = random_model(seed=5)
    path = save_rwkv7(model, tmp_path / "m.pth")
    tokens = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(path)(tokens), model(tokens), atol=1e-5, rtol=1e-5)  # chunks of 32, not 8
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an RWKV-7 checkpoint"):
        from_pretrained(tmp_path / "other.pth")


def test_lora_widths_are_the_published_checkpoints_widths() -> None:
    """The default LoRA widths (multiples of 32 of 1.8 sqrt(C), 1.3 sqrt(C), 0.6 C^0.8) are
    those of the published RWKV-7 checkpoints: C = 768 (0.1B) has w/a/v/g LoRAs of 64/64/32/128,
    C = 2048 (1.5B) 96/96/64/256; narrow models get at least 32."""
    from anyformer.nn.attention.rwkv7 import default_ranks

    order = ("decay_rank", "rate_rank", "value_rank", "gate_rank")
    assert [default_ranks(768)[k] for k in order] == [64, 64, 32, 128]
    assert [default_ranks(2048)[k] for k in order] == [96, 96, 64, 256]
    assert [default_ranks(64)[k] for k in order] == [32, 32, 32, 32]


def test_the_receptance_shift_mix_starts_at_its_known_values() -> None:
    """x_r = 1 - (c / C) ** (0.2 (1 - i / L)) for channel c of layer i (the reference's training
    code), at C = 64, L = 2, worked out by hand: layer 0 (power 0.2) and layer 1 (power 0.1)."""
    torch.manual_seed(0)
    model = build_model(model_config())
    mixes = [p.reshape(-1) for name, p in model.named_parameters() if name.endswith("x_r")]
    assert len(mixes) == 2
    want = {0: [1.0, 0.242142, 0.129449, 0.055912], 1: [1.0, 0.129449, 0.066967, 0.028358]}
    for layer, values in want.items():
        got = [float(mixes[layer][c]) for c in (0, 16, 32, 48)]
        assert got == pytest.approx(values, abs=2e-6), (layer, got)


def test_the_decay_base_and_output_norm_start_at_their_known_values() -> None:
    """w0 = -7 + 5 (c / (C - 1)) ** (0.85 + sqrt(i / (L - 1))) + 0.5 for channel c of layer i and
    the output group norm's gain ((1 + i) / L) ** 0.7 (the reference's training code), at C = 64,
    L = 2, worked out by hand: layer 0 (power 0.85, gain 0.5 ** 0.7) and layer 1 (power 1.85, gain 1)."""
    torch.manual_seed(0)
    model = build_model(model_config())
    params = dict(model.named_parameters())
    want = {0: [-6.5, -4.534754, -2.957642, -1.5], 1: [-6.5, -5.844918, -4.138428, -1.5]}
    gains = {0: 0.615572, 1: 1.0}
    for layer, values in want.items():
        (w0,) = [p.reshape(-1) for name, p in params.items() if name.endswith(f"{layer}.attn.sublayer.w0")]
        assert [float(w0[c]) for c in (0, 21, 42, 63)] == pytest.approx(values, abs=2e-6), layer
        (gain,) = [p for name, p in params.items() if name.endswith(f"{layer}.attn.sublayer.ln_x.weight")]
        assert torch.allclose(gain, torch.full_like(gain, gains[layer]), atol=2e-6), layer


def test_the_channel_mix_key_starts_uniform_within_half_over_sqrt_width() -> None:
    """The channel mix's key weights start uniform in +-0.5 / sqrt(C) and its value weights at
    zero (the reference's training code): at C = 64 the bound is 0.0625, and 16k draws come
    within 1% of it."""
    torch.manual_seed(0)
    model = build_model(model_config())
    keys = [m.key.weight for name, m in model.named_modules() if name.endswith("ffn.sublayer")]
    values = [m.value.weight for name, m in model.named_modules() if name.endswith("ffn.sublayer")]
    assert len(keys) == 2
    for key, value in zip(keys, values):
        assert 0.99 * 0.0625 <= float(key.abs().max()) <= 0.0625 and float(value.abs().max()) == 0.0


def test_lora_widths_of_one_are_allowed_and_zero_refused() -> None:
    model = build_model(model_config(decay_rank=1, rate_rank=1, value_rank=1, gate_rank=1)).eval()
    assert model(torch.randint(0, V, (1, 5))).shape == (1, 5, V)
    with pytest.raises(ConfigError, match="gate_rank must be >= 1, got 0"):
        build_model(model_config(gate_rank=0))
