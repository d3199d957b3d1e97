"""Cached decoding, batching, streaming, stopping and argument checks of anyformer.generation."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import orders_itself, skip_if_needs_graph

from anyformer.generation import GenerationConfig, generate, stream, stream_text
from anyformer.models.builders import build_model
from anyformer.models.presets import preset
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.positional import POSITIONALS


def _decoder(kind: str = "rope", kv_heads: int = 4, **kw: object) -> torch.nn.Module:
    cfg = preset("gpt2-tiny", positional={"kind": kind}, attention={"num_heads": 4, "num_kv_heads": kv_heads, "bias": True}, **kw)
    return build_model(cfg).eval()


def _seq2seq(kind: str = "t5", kv_heads: int = 4) -> torch.nn.Module:
    cfg = preset("t5-tiny", positional={"kind": kind}, attention={"num_heads": 4, "num_kv_heads": kv_heads, "scale": 1.0})
    return build_model(cfg).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("kind", POSITIONALS.names())
def test_cached_decoder_logits_equal_full_recompute(kind: str, kv_heads: int) -> None:
    skip_if_needs_graph(kind)
    model = _decoder(kind, kv_heads)
    x = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2, 16)
        parts = [model(x[:, :5], cache)] + [model(x[:, i : i + 1], cache) for i in range(5, 9)] + [model(x[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("kind", POSITIONALS.names())
def test_cached_encoder_decoder_logits_equal_full_recompute(kind: str, kv_heads: int) -> None:
    skip_if_needs_graph(kind)
    model = _seq2seq(kind, kv_heads)
    src, tgt = torch.randint(0, 512, (2, 7)), torch.randint(0, 512, (2, 9))
    src_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    calls = []
    with torch.no_grad():
        full = model(src, tgt, src_mask)
        memory = model.encode(src, src_mask)
        cache = model.make_cache(2, 12)
        for layer in model.decoder.blocks:  # count cross-attention key/value projections
            layer.cross_attn.sublayer.k_proj.register_forward_hook(lambda *a: calls.append(1))
        parts = [model.decode(tgt[:, :4], memory, src_mask, cache=cache)]
        parts += [model.decode(tgt[:, i : i + 1], memory, src_mask, cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(model.decoder.blocks)  # memory keys/values computed once per layer


@pytest.mark.parametrize("kind", ["rope", "alibi", "learned", "t5"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_batched_left_padded_equals_one_by_one(kind: str, kv_heads: int) -> None:
    model = _decoder(kind, kv_heads)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    batched = generate(model, prompts, max_new_tokens=10)
    n = batched.shape[1] - 10
    for row, p in zip(batched, prompts):
        alone = generate(model, p, max_new_tokens=10)[0]
        assert torch.equal(row[n - len(p) :], alone)


def test_batched_encoder_decoder_equals_one_by_one() -> None:
    model = _seq2seq("t5", 2)
    sources = [[3, 4, 5, 6, 7, 8], [10, 11], [12, 13, 14]]
    for beams in (1, 3):
        batched = generate(model, sources, max_new_tokens=8, num_beams=beams, decoder_start_token_id=0)
        for row, s in zip(batched, sources):
            alone = generate(model, s, max_new_tokens=8, num_beams=beams, decoder_start_token_id=0)[0]
            assert torch.equal(row[: alone.shape[0]], alone)
            assert (row[alone.shape[0] :] == 0).all()


def test_greedy_equals_argmax_of_full_recompute() -> None:
    model = _decoder("alibi", 2)
    out = generate(model, [7, 8, 9], max_new_tokens=6)[0]
    seq = [7, 8, 9]
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tolist() == seq


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_every_attention_kind_decodes_like_full_recompute(attention: str) -> None:
    # grouped key/value heads, unless the kind's defaults need one value head per query head
    kv_heads = 4 if getattr(ATTENTIONS.get(attention), "one_value_head_per_query_head", False) else 2
    positional = {"positional": {"kind": "none"}} if orders_itself(attention) else {}
    cfg = preset("llama-tiny", attention={"kind": attention, "num_heads": 4, "num_kv_heads": kv_heads}, **positional)
    model = build_model(cfg).eval()
    prompt = [7, 8, 9, 10, 11]
    greedy = generate(model, prompt, max_new_tokens=6)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert greedy == seq
    beams = generate(model, prompt, max_new_tokens=4, num_beams=3)
    assert beams.shape == (1, len(prompt) + 4) and beams[0, : len(prompt)].tolist() == prompt


def test_sampling_is_reproducible_with_a_seed_and_follows_the_filter() -> None:
    model = _decoder()
    cfg = GenerationConfig(do_sample=True, temperature=1.5, top_k=5, seed=123, max_new_tokens=12)
    a, b = generate(model, [[1, 2, 3], [4, 5]], cfg), generate(model, [[1, 2, 3], [4, 5]], cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, [[1, 2, 3], [4, 5]], cfg, seed=124))
    # every sampled token is among the top 5 of the full-recompute logits at its step
    seq = a[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0]
    for i in range(3, len(seq)):
        assert seq[i] in torch.topk(logits[i - 1], 5).indices.tolist()
    assert list(stream(model, [1, 2, 3], cfg)) == generate(model, [1, 2, 3], cfg)[0, 3:].tolist()


def test_stop_tokens_and_stop_strings() -> None:
    model = _decoder()
    free = generate(model, [[1, 2, 3], [4, 5, 6]], max_new_tokens=10)
    stop = int(free[0, 5])  # third new token of row 0
    out = generate(model, [[1, 2, 3], [4, 5, 6]], max_new_tokens=10, stop_tokens=[stop], pad_token_id=0)
    first = free[0, 3:].tolist().index(stop)
    assert out[0, 3 : 4 + first].tolist() == free[0, 3 : 4 + first].tolist()
    assert (out[0, 4 + first :] == 0).all()
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    new = free[0, 3:].tolist()
    stop_text = decode(new[2:4])
    k = next(k for k in range(1, 11) if stop_text in decode(new[:k]))  # first place the text is complete
    toks = list(stream(model, [1, 2, 3], max_new_tokens=10, stop_strings=[stop_text], decode=decode))
    assert toks == new[:k]
    text = decode(new)
    assert "".join(stream_text(model, [1, 2, 3], decode, max_new_tokens=10)) == text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 0}, "num_beams"),
        ({"stop_strings": ["x"]}, "decode"),
        ({"nucleus": 0.9}, "unknown generation setting"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(_decoder(), [1, 2], **kwargs)


def test_bad_prompts_raise_clear_errors() -> None:
    model = _decoder()  # max_seq_len 128
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="longer than the model's window"):
        generate(model, list(range(1, 200)), max_new_tokens=1)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, [1, 2], max_new_tokens=200)
    with pytest.raises(ValueError, match="relative positional"):
        generate(_decoder("learned"), [1, 2], max_new_tokens=4, window=8)


def _decodable(name: str) -> torch.nn.Module:
    from tests.helpers import build

    return {
        "decoder": lambda: build("decoder"),
        "encoder_decoder": lambda: build("encoder_decoder"),
        "megabyte": lambda: build("megabyte", vocab_size=64, max_seq_len=32, options__patch_size=4, options__local_dim=16,
                                  options__local_heads=2),
        "rmt": lambda: build("decoder", memory__kind="rmt", memory__options={"num_memory": 2, "segment_len": 8}),
        "infinite_former": lambda: build("decoder", memory__kind="infinite_former", memory__options={"segment_len": 8, "num_basis": 4}),
        "knn": lambda: build("decoder", memory__kind="knn", memory__options={"segment_len": 4, "memory_size": 8, "top_k": 2}),
    }[name]()


@pytest.mark.parametrize("name", ["decoder", "encoder_decoder", "megabyte", "rmt", "infinite_former", "knn"])
def test_last_only_logits_are_the_last_row_of_the_full_logits(name: str) -> None:
    """Protocol: decode_step(..., last_only=True) returns (b, 1, V), equal to the last position of
    the full call on a fresh cache (prefill asks for no more); a decoder runs its head on that
    position alone."""
    model = _decodable(name)
    torch.manual_seed(1)
    b, n = 2, 11  # several segments / patches for the memory and byte models
    tokens = torch.randint(1, 60, (b, n))
    source = model.encode_source(tokens, torch.ones_like(tokens, dtype=torch.bool)) if name == "encoder_decoder" else None
    outs = []
    for last_only in (False, True):
        cache = model.make_cache(b, 32)
        with torch.no_grad():
            outs.append(model.decode_step(tokens, cache, cache.next_positions(torch.ones_like(tokens, dtype=torch.bool)),
                                          source=source, last_only=last_only))
    full, last = outs
    assert full.shape[:2] == (b, n) and last.shape[:2] == (b, 1)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    if name == "decoder":
        rows: list[int] = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
        cache = model.make_cache(b, 32)
        with torch.no_grad():
            model.decode_step(tokens, cache, cache.next_positions(torch.ones_like(tokens, dtype=torch.bool)), last_only=True)
        hook.remove()
        assert rows == [1]
