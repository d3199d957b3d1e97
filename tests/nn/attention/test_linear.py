"""Linear attention and the kernelized machinery (chunked, recurrent, quadratic forms, decoding state)."""

import pytest
import torch
import torch.nn.functional as F

from anyformer.config import AttentionConfig, ConfigError
from anyformer.models.builders import build_model
from anyformer.nn.build_context import BuildContext
from anyformer.nn.attention import ATTENTIONS, AttentionContext
from anyformer.nn.attention.linear import (
    causal_linear_attention,
    linear_attention,
    quadratic_linear_attention,
    recurrent_linear_attention,
)
from anyformer.nn.positional import POSITIONALS, PositionalContext

from tests.helpers import build, tiny_config


def random_features(b=2, h=3, n=13, f=5, r=4, e=6):
    qn, kn = torch.randn(b, h, n, f), torch.randn(b, h, n, f)  # numerator features may be signed (RoPE)
    qd, kd = torch.rand(b, h, n, r) + 0.1, torch.rand(b, h, n, r) + 0.1
    return qn, kn, torch.randn(b, h, n, e), qd, kd


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
def test_parallel_chunked_and_recurrent_forms_agree(chunk_size):
    qn, kn, v, qd, kd = random_features()
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    parallel, _ = quadratic_linear_attention(qn, kn, v, qd, kd, mask=causal)
    chunked, (kv_c, ks_c) = causal_linear_attention(qn, kn, v, qd, kd, chunk_size=chunk_size)
    recurrent, (kv_r, ks_r) = recurrent_linear_attention(qn, kn, v, qd, kd)
    torch.testing.assert_close(chunked, parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_c, kv_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ks_c, ks_r, atol=1e-5, rtol=1e-5)


def test_chunked_form_continues_from_a_state():
    qn, kn, v, qd, kd = random_features()
    full, _ = causal_linear_attention(qn, kn, v, qd, kd, chunk_size=4)
    first, state = causal_linear_attention(*(t[:, :, :6] for t in (qn, kn, v, qd, kd)), chunk_size=4)
    second, _ = causal_linear_attention(*(t[:, :, 6:] for t in (qn, kn, v, qd, kd)), chunk_size=3, state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), full, atol=1e-5, rtol=1e-5)


def test_bidirectional_form_equals_unmasked_quadratic_form():
    qn, kn, v, qd, kd = random_features()
    torch.testing.assert_close(linear_attention(qn, kn, v, qd, kd), quadratic_linear_attention(qn, kn, v, qd, kd)[0], atol=1e-5, rtol=1e-5)


def shared_features(b=2, h=3, n=13, f=5, e=6):
    """Positive features used for numerator and normaliser alike (elu+1 linear attention): the
    chunked form takes its fused path (values with a column of ones) for these."""
    qn, kn = torch.rand(b, h, n, f) + 0.1, torch.rand(b, h, n, f) + 0.1
    return qn, kn, torch.randn(b, h, n, e)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
def test_shared_feature_chunked_form_agrees_with_quadratic_and_recurrent(chunk_size):
    qn, kn, v = shared_features()
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    parallel, _ = quadratic_linear_attention(qn, kn, v, qn, kn, mask=causal)
    chunked, (kv_c, ks_c) = causal_linear_attention(qn, kn, v, qn, kn, chunk_size=chunk_size)
    recurrent, (kv_r, ks_r) = recurrent_linear_attention(qn, kn, v, qn, kn)
    torch.testing.assert_close(chunked, parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_c, kv_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ks_c, ks_r, atol=1e-5, rtol=1e-5)
    # continuing from the state after 6 tokens, with another chunk size, equals one pass
    first, state = causal_linear_attention(qn[:, :, :6], kn[:, :, :6], v[:, :, :6], qn[:, :, :6], kn[:, :, :6], chunk_size=chunk_size)
    rest = (qn[:, :, 6:], kn[:, :, 6:], v[:, :, 6:], qn[:, :, 6:], kn[:, :, 6:])
    second, (kv_s, ks_s) = causal_linear_attention(*rest, chunk_size=3, state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), parallel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_s, kv_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ks_s, ks_r, atol=1e-5, rtol=1e-5)


def test_shared_feature_chunked_gradients_equal_quadratic_gradients():
    qn, kn, v = (t.requires_grad_() for t in shared_features(n=10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    g_quad = torch.autograd.grad(quadratic_linear_attention(qn, kn, v, qn, kn, mask=causal)[0].square().sum(), (qn, kn, v))
    g_chunk = torch.autograd.grad(causal_linear_attention(qn, kn, v, qn, kn, chunk_size=3)[0].square().sum(), (qn, kn, v))
    for a, b in zip(g_quad, g_chunk):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chunked_gradients_equal_quadratic_gradients():
    inputs = [t.requires_grad_() for t in random_features(n=10)]
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    g_quad = torch.autograd.grad(quadratic_linear_attention(*inputs, mask=causal)[0].square().sum(), inputs)
    g_chunk = torch.autograd.grad(causal_linear_attention(*inputs, chunk_size=3)[0].square().sum(), inputs)
    for a, b in zip(g_quad, g_chunk):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def rope_rotation(x, positions, base=10000.0):
    """Rotate (b, h, n, d) by positions, channel pairs (i, i + d/2), written with explicit 2x2 rotations."""
    d = x.shape[-1]
    out = x.clone()
    for p in range(d // 2):
        theta = positions.float() * base ** (-2 * p / d)  # (n,)
        c, s = theta.cos(), theta.sin()
        a, b = x[..., p], x[..., p + d // 2]
        out[..., p], out[..., p + d // 2] = a * c - b * s, a * s + b * c
    return out


def naive_linear(x, attn, *, causal, rotate):
    """O(n^2) reference: out_i = sum_j w_ij v_j / sum_j phi(q_i).phi(k_j), w_ij = (R_i phi(q_i)).(R_j phi(k_j))."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(b, n, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, h, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, h, d).transpose(1, 2)
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    rq, rk = (rope_rotation(pq, torch.arange(n)), rope_rotation(pk, torch.arange(n))) if rotate else (pq, pk)
    out = torch.zeros(b, h, n, d)
    for i in range(n):
        js = range(i + 1) if causal else range(n)
        num = sum((rq[:, :, i] * rk[:, :, j]).sum(-1, keepdim=True) * v[:, :, j] for j in js)
        den = sum((pq[:, :, i] * pk[:, :, j]).sum(-1, keepdim=True) for j in js)
        out[:, :, i] = num / (den + 1e-6)
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, h * d))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positional", ["none", "rope"])
def test_linear_kind_equals_naive_formula(causal, positional):
    acfg = AttentionConfig(kind="linear", num_heads=2, options={"chunk_size": 3})
    attn = ATTENTIONS.get("linear")(acfg, BuildContext.standalone(acfg, dim=16, causal=causal))
    pos = POSITIONALS.get(positional)(PositionalContext(16, 2, 8, 64, causal), POSITIONALS.get(positional).Options())
    x = torch.randn(2, 9, 16)
    q_pos = torch.arange(9).expand(2, 9)
    ctx = AttentionContext(q_pos=q_pos, k_pos=q_pos, positional=pos, causal=causal)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, ctx), naive_linear(x, attn, causal=causal, rotate=positional == "rope"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "performer"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_decoding_with_cache_equals_recomputation(kind, kv_heads, positional):
    model = build("decoder", attention__kind=kind, attention__num_kv_heads=kv_heads, positional__kind=positional, attention__options={"chunk_size": 4})
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 32)
        steps = [model(tokens[:, :5], cache)]
        after_prompt = [tuple(t.shape) for t in cache.layers[0].buffers()]
        steps += [model(tokens[:, i : i + 1], cache) for i in range(5, 12)]
    assert type(cache.layers[0]).__name__ == "LinearAttentionCache"
    # the state does not grow with length: the same buffers after 5 tokens and after 12
    assert [tuple(t.shape) for t in cache.layers[0].buffers()] == after_prompt
    assert all(32 not in shape and 12 not in shape for shape in after_prompt)  # nothing sized by capacity or length
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_key_padding_hides_padded_tokens(kind):
    model = build("encoder", attention__kind=kind, positional__kind="learned")
    tokens = torch.randint(1, 97, (1, 6))
    padded = torch.cat([tokens, torch.randint(1, 97, (1, 3))], 1)
    keep = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, keep)[:, :6], model(tokens), atol=1e-5, rtol=1e-5)


def test_attention_store_returns_normalised_weights():
    model = build("decoder", attention__kind="linear", positional__kind="none")
    store: list = []
    with torch.no_grad():
        tokens = torch.randint(0, 97, (1, 7))
        out = model(tokens, attn_store=store)
        ref = model(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # storing the weights changes nothing
    assert len(store) == 2
    w = store[0]
    assert (w.triu(1) == 0).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-4, rtol=0)


def test_quadratic_form_with_a_logit_bias_equals_the_formula_as_loops():
    """A logit bias b_ij multiplies the kernel by exp(b_ij), in the numerator and the
    normaliser alike: out_i = sum_j phi(q_i).phi(k_j) e^b_ij v_j / (sum_j phi'(q_i).phi'(k_j) e^b_ij + eps)."""
    g = torch.Generator().manual_seed(0)
    qn, kn, qd, kd = (torch.rand(1, 2, 5, 3, generator=g) for _ in range(4))
    v, bias = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 5, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    got, _ = quadratic_linear_attention(qn, kn, v, qd, kd, mask=causal, bias=bias)
    want = torch.zeros(1, 2, 5, 4)
    for h in range(2):
        for i in range(5):
            num = sum((qn[0, h, i] @ kn[0, h, j]) * bias[0, h, i, j].exp() * v[0, h, j] for j in range(i + 1))
            den = sum((qd[0, h, i] @ kd[0, h, j]) * bias[0, h, i, j].exp() for j in range(i + 1))
            want[0, h, i] = num / (den + 1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bias_positional_cannot_use_the_recurrent_state():
    model = build("decoder", attention__kind="linear", positional__kind="alibi")
    with pytest.raises(ValueError, match="constant-size state"):
        model(torch.randint(0, 97, (1, 4)), model.make_cache(1, 8))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention__dropout=0.1), "dropout"),
        (dict(attention__options={"chunk": 4}), "chunk"),
        (dict(attention__scale=0.5), "scale"),
    ],
)
def test_bad_linear_config_raises(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config("decoder", attention__kind="linear", **overrides))
