"""The chunked (memory-efficient) kernel equals the eager reference with the equivalent dense
mask and bias, for outputs and for gradients of q, k, v and bias parameters."""

import math

import pytest
import torch

from anyformer.nn.attention import KERNELS
from anyformer.nn.attention.chunked import PositionalBlockBias, _schedule, chunked_attention
from anyformer.nn.attention.kernels import eager_attention
from anyformer.nn.attention.patterns import NONE, BlockLayout, Causal, Window
from anyformer.nn.positional import POSITIONALS, PositionalContext
from tests.helpers import build, reference_causal_mask

B, H, D = 2, 4, 16
TOL = 1e-5


def positional(kind: str, causal: bool):
    cls = POSITIONALS.get(kind)
    pos = cls(PositionalContext(dim=H * D, num_heads=H, head_dim=D, max_seq_len=512, causal=causal), cls.Options())
    if kind == "t5":
        torch.nn.init.normal_(pos.table.weight, std=1.0)
    return pos


def compare(n, m, g=H, *, causal=False, mask=None, bias=None, pos=None, pattern=None, dense_mask=None, blocks=(16, 32)):
    """Run chunked and eager on the same inputs; return the max abs differences."""
    q = torch.randn(B, H, n, D, requires_grad=True)
    k = torch.randn(B, g, m, D, requires_grad=True)
    v = torch.randn(B, g, m, D, requires_grad=True)
    q_pos = torch.arange(m - n, m).expand(B, n)
    k_pos = torch.arange(m).expand(B, m)
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    leaves += [p for p in (pos.parameters() if pos is not None else [])]
    block_bias = PositionalBlockBias(pos, q_pos, k_pos) if pos is not None else None
    got = chunked_attention(
        q, k, v, mask=mask, bias=bias, causal=causal, block_bias=block_bias, pattern=pattern,
        q_block=blocks[0], k_block=blocks[1],
    )
    dense_bias = bias
    if pos is not None:
        pb = pos.bias(q_pos, k_pos)
        dense_bias = pb if dense_bias is None else pb + dense_bias
    ref_mask = mask
    if dense_mask is not None:
        ref_mask = dense_mask if ref_mask is None else ref_mask & dense_mask
    want = eager_attention(q, k, v, mask=ref_mask, bias=dense_bias, causal=causal)
    upstream = torch.randn_like(want)
    g_got = torch.autograd.grad((got * upstream).sum(), leaves)
    g_want = torch.autograd.grad((want * upstream).sum(), leaves)
    diffs = [(got - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g_got, g_want)]
    return diffs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nm", [(70, 70), (21, 90), (1, 45), (30, 12)])
def test_plain_and_causal_with_cache_offset(causal, nm):
    assert max(compare(*nm, causal=causal)) <= TOL


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention(kv_heads):
    assert max(compare(50, 75, kv_heads, causal=True)) <= TOL


@pytest.mark.parametrize("kind", ["alibi", "t5"])
@pytest.mark.parametrize("causal", [False, True])
def test_positional_bias_generated_per_block(kind, causal):
    # gradients include the T5 bucket table (the last diff)
    diffs = compare(60, 80, 2, causal=causal, pos=positional(kind, causal))
    assert max(diffs) <= TOL
    if kind == "t5":
        assert len(diffs) == 5


def test_dense_bias_gets_gradient():
    bias = torch.randn(1, H, 40, 50, requires_grad=True)
    assert max(compare(40, 50, causal=True, bias=bias)) <= TOL


def test_key_padding_and_fully_masked_rows():
    n, m = 33, 47
    pad = torch.ones(B, m, dtype=torch.bool)
    pad[1, -20:] = False
    pad[0, :] = False  # every query of batch 0 has nothing to attend: output and gradients 0
    assert max(compare(n, m, mask=pad[:, None, None, :])) <= TOL
    q, k, v = torch.randn(B, H, n, D), torch.randn(B, H, m, D), torch.randn(B, H, m, D)
    out = chunked_attention(q, k, v, mask=pad[:, None, None, :], q_block=8, k_block=8)
    assert (out[0] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_with_alibi(causal):
    n = m = 96
    pattern = Window(10)
    diffs = compare(n, m, causal=causal, pos=positional("alibi", causal), pattern=pattern, dense_mask=pattern.dense(n, m))
    assert max(diffs) <= TOL


def test_block_layout_mask_and_general_dense_mask():
    n = m = 64
    layout = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) > 0.5
    layout[:, 0] = True
    pattern = BlockLayout(layout, 16)
    assert max(compare(n, m, pattern=pattern, dense_mask=pattern.dense(n, m))) <= TOL
    adjacency = torch.rand(B, 1, n, m) > 0.3
    assert max(compare(n, m, g=2, causal=True, mask=adjacency)) <= TOL


def test_empty_blocks_are_skipped():
    n = m = 4096
    causal = _schedule(Causal(), n, m, 512, 512)
    assert sum(len(b) for _, _, b in causal) == 8 * 9 // 2  # the lower triangle of 8 x 8 blocks
    band = _schedule(Window(256), n, m, 256, 256)
    assert max(len(b) for _, _, b in band) == 3 and all(s != NONE for _, _, b in band for _, _, s in b)


def test_memory_saved_for_backward_is_linear():
    n = m = 512
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    q = torch.randn(1, H, n, D, requires_grad=True)
    k, v = torch.randn(1, H, m, D), torch.randn(1, H, m, D)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_attention(q, k, v, causal=True, q_block=64, k_block=64)
    assert max(saved) <= H * n * D and sum(saved) < H * n * m / 4  # never an n x m matrix


def test_dropout_is_refused_with_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        KERNELS.get("chunked")(q, q, q, dropout=0.1)


@pytest.mark.parametrize("positional_kind", ["alibi", "t5", "rope"])
def test_model_with_chunked_kernel_matches_eager_with_gradients(positional_kind):
    tokens = torch.randint(0, 97, (2, 24))
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1, 18:] = False
    outs, grads = [], []
    for kernel in ("eager", "chunked"):
        model = build("decoder", seed=5, attention__kernel=kernel, attention__num_kv_heads=2, positional__kind=positional_kind)
        logits = model(tokens, attention_mask=keep)
        logits.square().mean().backward()
        outs.append(logits)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], atol=TOL, rtol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=TOL, rtol=0, msg=name)


def test_model_decodes_with_cache_like_without():
    model = build("decoder", seed=2, attention__kernel="chunked", positional__kind="alibi")
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 12)
        steps = [model(tokens[:, :7], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=0)


def test_causal_reference_mask_convention():
    # the kernel's causal convention is the library's: query i sees keys j <= i + (m - n)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    a = chunked_attention(q, k, v, causal=True, q_block=2, k_block=2)
    b = eager_attention(q, k, v, mask=reference_causal_mask(3, 5))
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "alibi"])
def test_pytorch_softmax_path_equals_reference_too(case, monkeypatch):
    """The online-softmax steps run in C++ on AVX-512 CPUs; the PyTorch ops that replace them
    elsewhere (and on other devices) must meet the same reference."""
    import anyformer.nn.attention.chunked as chunked

    monkeypatch.setattr(chunked, "native_softmax", lambda device, dtype: None)
    if case == "padding":
        pad = torch.ones(B, 47, dtype=torch.bool)
        pad[1, -20:] = False
        pad[0, :] = False
        diffs = compare(33, 47, mask=pad[:, None, None, :])
    elif case == "alibi":
        diffs = compare(40, 60, causal=True, pos=positional("alibi", True))
    else:
        diffs = compare(70, 70, causal=case == "causal")
    assert max(diffs) <= TOL


def test_native_online_softmax_equals_its_pytorch_steps():
    from anyformer.nn.attention.chunked import native_softmax

    native = native_softmax(torch.device("cpu"), torch.float32)
    if native is None:
        pytest.skip("the C++ softmax kernels need a C++ toolchain and an AVX-512 CPU")
    torch.manual_seed(0)
    lowest = torch.finfo(torch.float32).min
    row_max = torch.full((6, 9, 1), lowest)
    row_sum = torch.zeros(6, 9, 1)
    ref_max, ref_sum = row_max.clone(), row_sum.clone()
    for cols in (37, 16, 200):  # successive blocks, tails of every width
        s = torch.randn(6, 9, cols) * 8
        s[0, 3] = float("-inf")  # a row with nothing visible in any block
        s[2, :4, : cols // 2] = float("-inf")
        ref = s.clone()
        alpha = native.online_softmax_(s, row_max, row_sum)
        new = torch.maximum(ref_max, ref.amax(-1, keepdim=True))
        p = (ref - new).exp2()
        ref_alpha = (ref_max - new).exp2()
        ref_sum = ref_sum * ref_alpha + p.sum(-1, keepdim=True)
        ref_max = new
        torch.testing.assert_close(s, p, rtol=3e-7, atol=1e-30)
        torch.testing.assert_close(alpha, ref_alpha, rtol=3e-7, atol=1e-30)
        torch.testing.assert_close(row_sum, ref_sum, rtol=1e-6, atol=0)
        assert torch.equal(row_max, ref_max)
    assert (row_sum[0, 3] == 0).all() and (row_max[0, 3] == lowest).all()
    # exp2 against float64 over the normal range, and exact 0 for masked logits
    x = torch.linspace(-126, 0, 100001).view(1, -1)
    y = x.clone()
    native.exp2_shift_(y, torch.zeros(1))
    exact = x.double().exp2()
    assert ((y.double() - exact).abs() / exact).max() < 2e-7
    z = torch.tensor([[float("-inf"), -1e30, 3.0]])
    native.exp2_shift_(z, torch.tensor([float("inf")]))
    assert torch.equal(z, torch.zeros(1, 3))
    p, dp, delta = torch.rand(4, 5, 33), torch.randn(4, 5, 33), torch.randn(4, 5, 1)
    want = p * (dp - delta)
    native.softmax_grad_(p, dp, delta)
    torch.testing.assert_close(p, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="one value per row"):
        native.online_softmax_(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("shape", [(1, 12, 12, 80, 64), (2, 8, 2, 37, 40), (1, 4, 1, 1, 16), (3, 6, 3, 700, 24)])
def test_native_one_query_attention_equals_float64_softmax(shape):
    """Cached decoding's one-query kernel: grouped heads read their group's keys, keys/values are
    slices of a longer preallocated cache (strided), and it agrees with the float64 softmax."""
    from anyformer.nn.attention.chunked import native_softmax

    native = native_softmax(torch.device("cpu"), torch.float32)
    if native is None:
        pytest.skip("the C++ softmax kernels need a C++ toolchain and an AVX-512 CPU")
    b, h, g, m, d = shape
    torch.manual_seed(m)
    q = torch.randn(b, h, 1, d)
    cache_k, cache_v = torch.randn(b, g, m + 9, d), torch.randn(b, g, m + 9, d)
    k, v = cache_k[:, :, :m], cache_v[:, :, :m]
    got = native.decode_attention(q, k, v, 0.3)
    kk, vv = k.repeat_interleave(h // g, 1).double(), v.repeat_interleave(h // g, 1).double()
    want = torch.softmax(q.double() @ kk.transpose(-1, -2) * 0.3, -1) @ vv
    assert got.shape == (b, h, 1, d)
    assert (got.double() - want).abs().max() <= TOL
    with pytest.raises(RuntimeError, match="shapes do not match"):
        native.decode_attention(q, k[:, :, :, :-1], v, 0.3)


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m,g,blocks", [(70, 70, 4, (16, 32)), (37, 90, 2, (8, 8)), (50, 20, 1, (16, 16)), (1, 45, 4, (256, 256)),
                                          (300, 300, 2, (64, 128))])
def test_native_chunked_forward_equals_float64_softmax(n, m, g, blocks, causal, alibi):
    """The C++ forward (plain and causal attention, optionally ALiBi, one parallel region per
    call): output and base-2 log-sum-exp against float64, grouped heads, ragged last blocks, and
    more queries than keys (causal rows with no visible key give zeros and an infinite
    log-sum-exp)."""
    from anyformer.nn.attention.chunked import native_softmax

    native = native_softmax(torch.device("cpu"), torch.float32)
    if native is None:
        pytest.skip("the C++ softmax kernels need a C++ toolchain and an AVX-512 CPU")
    torch.manual_seed(n + m)
    q, k, v = torch.randn(B, H, n, D), torch.randn(B, g, m, D), torch.randn(B, g, m, D)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else torch.empty(0)
    out, lse = native.chunked_forward(q, k, v, 0.3, causal, *blocks, slopes, m - n)
    kk, vv = k.repeat_interleave(H // g, 1).double(), v.repeat_interleave(H // g, 1).double()
    logits = q.double() @ kk.transpose(-1, -2) * 0.3  # (B, H, n, m)
    if alibi:  # query i is at position i + m - n
        dist = (torch.arange(n)[:, None] + m - n - torch.arange(m)[None, :]).abs().double()
        logits = logits - slopes.double()[:, None, None] * dist
    if causal:
        logits = logits.masked_fill(~reference_causal_mask(n, m), float("-inf"))
    seen = torch.isfinite(logits).any(-1, keepdim=True)
    want = torch.where(seen, torch.softmax(logits, -1).nan_to_num(0.0) @ vv, 0.0)
    want_lse = torch.where(seen, torch.logsumexp(logits, -1, keepdim=True) / math.log(2), float("inf"))
    assert (out.double() - want).abs().max() <= TOL
    assert torch.equal(torch.isinf(lse), ~seen)
    assert (lse.double() - want_lse)[seen].abs().max() <= TOL
    with pytest.raises(RuntimeError, match="contiguous float32"):
        native.chunked_forward(q.double(), k, v, 0.3, causal, *blocks, slopes, m - n)


@pytest.mark.parametrize("bias, out_bias, want", [
    (False, None, [False] * 4), (True, None, [True] * 4), (True, False, [True, True, True, False]), (False, True, [False, False, False, True]),
])
def test_the_output_projection_bias_follows_bias_unless_out_bias_is_set(bias: bool, out_bias: bool | None, want: list[bool]) -> None:
    """model.attention.out_bias unset follows model.attention.bias (GPT-2: all four biased);
    set, it decides the output projection's alone (Llama-style models with biased q/k/v)."""
    model = build("decoder", attention__bias=bias, attention__out_bias=out_bias)
    attn = model.stack.blocks[0].attn.sublayer
    assert [getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj")] == want
