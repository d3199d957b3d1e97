"""Relative-position attention (positional kinds `shaw` and `music_relative`): Shaw et al.'s key
term against transformers' Wav2Vec2BertSelfAttention (position_embeddings_type
"relative_key"), the key and value terms against the paper's formula written with loops in
float64, the Music Transformer's skewed logits against the explicit (n, m, d) gather, on the
eager, sdpa and chunked kernels; several chunked blocks with every gradient against dense
float64 attention, each term asked for one block at most; decoding with the cache as by
recomputing; and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer import ConfigError, ModelConfig, build_model
from anyformer.generation import generate
from anyformer.nn.attention import KERNELS, AttentionContext, MultiHeadAttention
from anyformer.nn.attention.block_bias import PositionalBlockBias
from anyformer.nn.attention.chunked import chunked_attention
from anyformer.nn.positional import PositionalContext
from anyformer.nn.positional.relative import MusicRelative, ShawRelative
from tests.helpers import greedy_by_recompute

KERNEL_NAMES = ["eager", "sdpa", "chunked"]


def shaw(dim: int, heads: int, k: int, values: bool = True, max_len: int = 32) -> ShawRelative:
    return ShawRelative(PositionalContext(dim, heads, dim // heads, max_len, True), ShawRelative.Options(max_distance=k, values=values))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_shaw_key_term_equals_transformers_relative_key(kernel: str) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertSelfAttention

    cfg = transformers.Wav2Vec2BertConfig(hidden_size=16, num_attention_heads=2, position_embeddings_type="relative_key",
                                          left_max_position_embeddings=3, right_max_position_embeddings=3, attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Wav2Vec2BertSelfAttention(cfg).eval()
    ours = MultiHeadAttention.standard(16, 2, kernel=KERNELS.get(kernel), bias=True, out_bias=True).eval()
    pos = shaw(16, 2, 3, values=False)
    with torch.no_grad():
        for mine, theirs in ((ours.q_proj, hf.linear_q), (ours.k_proj, hf.linear_k), (ours.v_proj, hf.linear_v), (ours.o_proj, hf.linear_out)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        pos.keys.copy_(hf.distance_embedding.weight)
        x = torch.randn(2, 9, 16)
        at = torch.arange(9).expand(2, 9)
        got = ours(x, AttentionContext(q_pos=at, k_pos=at, positional=pos, causal=False))
        want = hf(x)[0]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def naive_shaw(layer: MultiHeadAttention, pos: ShawRelative, x: torch.Tensor) -> torch.Tensor:
    """Causal self-attention with both of Shaw et al.'s terms, one (query, key) pair at a time,
    in float64: e_ij = q_i . (k_j + a^K_r) / sqrt(d), z_i = sum_j p_ij (v_j + a^V_r)."""
    b, n, _ = x.shape
    h, d, k = layer.num_heads, layer.head_dim, pos.options.max_distance
    x = x.detach().double()
    q, kk, v = ((proj.weight.detach().double() @ x.transpose(1, 2)).view(b, h, d, n) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    ak, av = pos.keys.detach().double(), pos.values.detach().double()
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                rows = [max(-k, min(k, j - i)) + k for j in range(i + 1)]
                logits = torch.tensor([float(q[bi, hi, :, i] @ (kk[bi, hi, :, j] + ak[r])) / math.sqrt(d) for j, r in enumerate(rows)])
                p = torch.softmax(logits.double(), 0)
                out[bi, hi, i] = sum(p[j] * (v[bi, hi, :, j] + av[r]) for j, r in enumerate(rows))
    return out.transpose(1, 2).reshape(b, n, h * d) @ layer.o_proj.weight.detach().double().T


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_shaw_key_and_value_terms_equal_the_formula_with_loops(kernel: str) -> None:
    torch.manual_seed(0)
    layer = MultiHeadAttention.standard(16, 2, kernel=KERNELS.get(kernel)).eval()
    pos = shaw(16, 2, 2)
    x = torch.randn(2, 7, 16)
    at = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        got = layer(x, AttentionContext(q_pos=at, k_pos=at, positional=pos, causal=True))
    assert torch.allclose(got.double(), naive_shaw(layer, pos, x), atol=1e-5)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("causal", [True, False])
def test_music_relative_logits_equal_the_explicit_gather(kernel: str, causal: bool) -> None:
    """The skewed form against q_i . E[h, j - i] with E gathered for every pair: (n, m, d)."""
    torch.manual_seed(0)
    layer = MultiHeadAttention.standard(16, 2, kernel=KERNELS.get(kernel)).eval()
    pos = MusicRelative(PositionalContext(16, 2, 8, 12, causal), MusicRelative.Options())
    x = torch.randn(2, 10, 16)
    at = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        got = layer(x, AttentionContext(q_pos=at, k_pos=at, positional=pos, causal=causal))
        q, k, v = (proj(x).view(2, 10, 2, 8).transpose(1, 2).double() for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        rel = (at[:, None, :] - at[:, :, None]).clamp(-pos.limit, pos.limit) + pos.limit  # (b, n, m)
        table = pos.table.double()  # (h, R, d)
        gathered = torch.stack([table[:, rel[bi]] for bi in range(2)])  # (b, h, n, m, d)
        logits = (q @ k.transpose(-1, -2) + torch.einsum("bhnd,bhnmd->bhnm", q, gathered)) / math.sqrt(8)
        if causal:
            logits = logits.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
        want = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(2, 10, 16) @ layer.o_proj.weight.double().T
    assert torch.allclose(got.double(), want, atol=1e-5)


class Recording:
    """Wraps an encoding, recording the (queries, keys) extent of every term asked of it."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.extents = inner, []

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def query_bias(self, q, q_pos, k_pos, scale):  # type: ignore[no-untyped-def]
        self.extents.append((q_pos.shape[1], k_pos.shape[1]))
        return self.inner.query_bias(q, q_pos, k_pos, scale)

    def value_term(self, p, q_pos, k_pos):  # type: ignore[no-untyped-def]
        self.extents.append((q_pos.shape[1], k_pos.shape[1]))
        return self.inner.value_term(p, q_pos, k_pos)


@pytest.mark.parametrize("kind", ["shaw", "music_relative"])
def test_chunked_blocks_with_every_gradient_against_dense_attention(kind: str) -> None:
    """Several query and key blocks, grouped heads, queries the last n of m keys, offset rows:
    output and the gradients of q, k, v and the tables equal dense float64 attention with the
    terms added to the whole matrices, and no term is ever asked for more than one block."""
    torch.manual_seed(1)
    b, h, g, n, m, d, scale = 2, 4, 2, 10, 13, 8, 0.3
    inner = (shaw(h * d, h, 3) if kind == "shaw" else MusicRelative(PositionalContext(h * d, h, d, 16, True), MusicRelative.Options()))
    pos = Recording(inner)
    tables = [p for p in inner.parameters()]
    q = torch.randn(b, h, n, d, requires_grad=True)
    k, v = (torch.randn(b, g, m, d, requires_grad=True) for _ in range(2))
    k_pos = torch.arange(m).expand(b, m) + torch.tensor([[0], [5]])
    q_pos = k_pos[:, m - n:]
    out = chunked_attention(q, k, v, causal=True, scale=scale, q_block=3, k_block=4, block_bias=PositionalBlockBias(pos, q_pos, k_pos, scale))
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v, *tables), grad_out)
    assert pos.extents and max(e[0] for e in pos.extents) <= 3 and max(e[1] for e in pos.extents) <= 4

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    tables64 = [t.detach().double().requires_grad_() for t in tables]
    kk, vv = (t.repeat_interleave(h // g, dim=1) for t in (k64, v64))
    if kind == "shaw":
        limit = 3
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-limit, limit) + limit  # (b, n, m)
        a_k, a_v = tables64
        extra = torch.einsum("bhnd,bnmd->bhnm", q64, a_k[rel])
    else:
        limit = inner.limit
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-limit, limit) + limit
        (table,) = tables64
        extra = torch.einsum("bhnd,bhnmd->bhnm", q64, torch.stack([table[:, rel[i]] for i in range(b)]))
    logits = (q64 @ kk.transpose(-1, -2) + extra) * scale
    visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    ref = p @ vv
    if kind == "shaw":
        ref = ref + torch.einsum("bhnm,bnmd->bhnd", p, a_v[rel])
    refs = torch.autograd.grad(ref, (q64, k64, v64, *tables64), grad_out.double())
    assert torch.allclose(out.double(), ref, atol=1e-5)
    for i, (a, r) in enumerate(zip(ours, refs)):
        assert torch.allclose(a.double(), r, atol=1e-4), i


def model(kind: str, kernel: str, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=24, dim=32, num_layers=2, max_seq_len=48, attention={"num_heads": 4, "kernel": kernel},
                                   positional={"kind": kind, "options": options}))


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("kind", ["shaw", "music_relative"])
def test_cached_decoding_equals_recompute(kind: str, kernel: str) -> None:
    m = model(kind, kernel, **({"max_distance": 4} if kind == "shaw" else {})).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert generate(m, [prompt], max_new_tokens=16)[0].tolist() == greedy_by_recompute(m, prompt, 16)


def test_kernels_agree_in_a_model() -> None:
    tokens = torch.randint(0, 24, (2, 30))
    with torch.no_grad():
        outs = [model("shaw", kernel, max_distance=5)(tokens) for kernel in KERNEL_NAMES]
    assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs[1:])


def test_bad_settings_and_kinds_that_cannot_take_the_terms_say_so() -> None:
    with pytest.raises(ConfigError, match="max_distance must be at least 1"):
        model("shaw", "sdpa", max_distance=0)
    tokens = torch.randint(0, 24, (1, 8))
    for kind, message in [("differential", "does not take"), ("linear", "kernelized attention cannot fold")]:
        torch.manual_seed(0)
        m = build_model(ModelConfig(vocab_size=24, dim=32, num_layers=1, max_seq_len=16, attention={"num_heads": 4, "kind": kind},
                                    positional={"kind": "shaw"}))
        with pytest.raises(ValueError, match=message):
            m(tokens)


@pytest.mark.parametrize("per_head", [False, True])
def test_skewed_gathered_and_constant_layouts_equal_the_explicit_gather(per_head: bool) -> None:
    """relative_logits and relative_values against table[clip(j - i)] gathered for every pair:
    consecutive positions (the strided skew), positions with gaps and rows at different offsets
    (the gather), and a block far from the diagonal where every pair clips to one distance."""
    from anyformer.nn.positional.relative import _layout, relative_logits, relative_values

    torch.manual_seed(0)
    b, h, d, limit = 2, 3, 4, 5
    table = torch.randn(h, 2 * limit + 1, d) if per_head else torch.randn(2 * limit + 1, d)
    cases = {
        "skew": (torch.arange(20, 26).expand(b, 6), torch.arange(14, 27).expand(b, 13)),
        "gather": (torch.tensor([[3, 4, 7, 9], [0, 2, 3, 8]]), torch.tensor([[0, 1, 2, 5, 6, 9], [1, 2, 3, 4, 6, 8]])),
        "constant": (torch.arange(40, 44).expand(b, 4), torch.arange(0, 7).expand(b, 7)),
    }
    for how, (q_pos, k_pos) in cases.items():
        assert _layout(q_pos, k_pos, limit)[0] == how
        q, p = torch.randn(b, h, q_pos.shape[1], d), torch.rand(b, h, q_pos.shape[1], k_pos.shape[1])
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-limit, limit) + limit  # (b, n, m)
        rows = torch.stack([table[..., rel[i], :] for i in range(b)])  # (b, [h,] n, m, d)
        rows = rows if per_head else rows[:, None]
        want_logits = torch.einsum("bhnd,bhnmd->bhnm", q, rows.expand(b, h, *rows.shape[2:]))
        want_values = torch.einsum("bhnm,bhnmd->bhnd", p, rows.expand(b, h, *rows.shape[2:]))
        got = relative_logits(q, table, q_pos, k_pos, limit).expand_as(want_logits)
        assert torch.allclose(got, want_logits, atol=1e-5), how
        assert torch.allclose(relative_values(p, table, q_pos, k_pos, limit), want_values, atol=1e-5), how


def test_the_tables_start_normal_with_std_one_over_sqrt_head_width() -> None:
    """Every relative table starts N(0, d^-1/2) for head width d: the relative embeddings'
    initialisation of the Music Transformer's code (tensor2tensor's `get_relative_embeddings_left`,
    stddev depth ** -0.5), used for Shaw's key and value tables too. At d = 64 and 257 rows the
    sample's spread pins the scale within 2% (its standard error is 0.3%)."""
    torch.manual_seed(0)
    ctx = PositionalContext(dim=128, num_heads=2, head_dim=64, max_seq_len=129, causal=True)
    shaw = ShawRelative(ctx, ShawRelative.Options(max_distance=128))
    music = MusicRelative(ctx, MusicRelative.Options())
    for name, table in (("shaw keys", shaw.keys), ("shaw values", shaw.values), ("music", music.table)):
        assert table.shape[-2:] == (257, 64), name
        assert abs(float(table.std()) - 64**-0.5) <= 0.02 * 64**-0.5 and abs(float(table.mean())) < 0.01, name
