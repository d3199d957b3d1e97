"""Hierarchical attention (kind `hierarchical`, H-Transformer-1D): the kernel against the
hierarchy written as a naive loop over (query, key) pairs, against exact attention where one
block holds everything, against the `h-transformer-1d` package's HAttention1D on the same
weights (with its conventions aligned, see below), gradients against the dense form, decoding
rows against whole-sequence rows, the stored weights against the output, FLOPs against torch's
counter, and the inputs it refuses."""

from __future__ import annotations

import unittest.mock as mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from anyformer import ModelConfig, build_model
from anyformer.config import AttentionConfig, ConfigError
from anyformer.generation import generate
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.attention.hierarchical import (
    HierarchicalKernel,
    causal_hierarchical_attention,
    causal_hierarchical_rows,
    dense_hierarchical_weights,
    hierarchical_attention,
)
from anyformer.nn.build_context import BuildContext
from anyformer.nn.kv_cache import CacheSpec
from tests.helpers import greedy_by_recompute


def naive(q, k, v, *, block, causal, levels=None, keep=None):  # type: ignore[no-untyped-def]
    """The paper's hierarchy one (query, key) pair at a time, in float64: the pair's level is
    where their blocks are first split apart (the highest differing bit of the block indices;
    0 within a block); there each side is the mean of its group of 2^level real tokens (the
    query stays itself when causal); one softmax over the logits of every key allowed."""
    b, h, n, d = q.shape
    keep = torch.ones(b, n, dtype=torch.bool) if keep is None else keep
    total = 1
    while total * block < n:
        total *= 2
    top = total.bit_length() - 1 if levels is None else min(total.bit_length() - 1, levels)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(n):
            logits, vals = [], []
            for j in range(n):
                if (causal and j > i) or not keep[bi, j]:
                    continue
                I, J = i // block, j // block
                level = 0 if I == J else (I ^ J).bit_length() - 1
                if level >= max(top, 1):
                    continue
                g = 2**level
                gq = [t for t in range(i // g * g, i // g * g + g) if t < n and keep[bi, t]]
                gk = [t for t in range(j // g * g, j // g * g + g) if t < n and keep[bi, t]]
                qq = q[bi, :, i] if causal else (q[bi, :, gq].mean(1) if gq else torch.zeros(h, d, dtype=q.dtype))
                kk = k[bi, :, gk].mean(1)
                logits.append((qq * kk).sum(-1) * d**-0.5)  # (h,)
                vals.append(v[bi, :, j])
            if logits:
                p = torch.softmax(torch.stack(logits, -1).double(), -1)  # (h, keys)
                out[bi, :, i] = (p[..., None] * torch.stack(vals, 1).double()).sum(1)
    return out


def qkv(b: int = 2, h: int = 2, n: int = 24, d: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,block,levels", [(24, 2, None), (16, 4, None), (21, 2, 2), (7, 4, None), (13, 1, None)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_equals_the_pairwise_hierarchy(causal: bool, n: int, block: int, levels: int | None, masked: bool) -> None:
    q, k, v = qkv(n=n)
    keep = None
    if masked:
        keep = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, 0] = True
    fn = causal_hierarchical_attention if causal else hierarchical_attention
    ours = fn(q, k, v, block=block, levels=levels, keep=keep)
    ref = naive(q, k, v, block=block, causal=causal, levels=levels, keep=keep)
    rows = torch.ones(2, n, dtype=torch.bool) if keep is None or causal else keep  # a masked query's own row is not used
    torch.testing.assert_close(ours[rows[:, None].expand(-1, 2, -1)], ref[rows[:, None].expand(-1, 2, -1)], atol=1e-12, rtol=0)
    weights = dense_hierarchical_weights(q, k, block=block, causal=causal, levels=levels, keep=keep)
    torch.testing.assert_close((weights @ v)[rows[:, None].expand(-1, 2, -1)], ref[rows[:, None].expand(-1, 2, -1)], atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_one_block_is_exact_attention(causal: bool) -> None:
    q, k, v = qkv(n=16)
    fn = causal_hierarchical_attention if causal else hierarchical_attention
    torch.testing.assert_close(fn(q, k, v, block=16), F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_stay_finite_in_float32(causal: bool) -> None:
    """One shift for all levels of a query, the largest of its logits: with logits in the
    hundreds (fp32 exp overflows above 88), the result still equals the float64 dense form."""
    q, k, v = qkv(n=64, d=8)
    q = q * 40
    ref = dense_hierarchical_weights(q, k, block=4, causal=causal) @ v
    fn = causal_hierarchical_attention if causal else hierarchical_attention
    ours = fn(q.float(), k.float(), v.float(), block=4)
    assert bool(ours.isfinite().all())
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=0)


def test_far_keys_are_coarsened_not_dropped() -> None:
    """Every key gets weight (full coverage), and where a far block's keys are all equal its
    coarse key is exact, so moving content between far tokens of one group changes nothing
    there but changes exact attention."""
    q, k, v = qkv(b=1, h=1, n=32, d=4)
    weights = dense_hierarchical_weights(q, k, block=4, causal=False)
    assert bool((weights > 0).all()) and torch.allclose(weights.sum(-1), torch.ones(1, 1, 32, dtype=torch.float64))
    k2 = k.clone()
    k2[:, :, 16:18] = k[:, :, 16:18].flip(2)  # swap two keys within a level-2 group, far from queries 0-3
    out, out2 = hierarchical_attention(q, k, v, block=4), hierarchical_attention(q, k2, v, block=4)
    torch.testing.assert_close(out[:, :, :4], out2[:, :, :4], atol=1e-12, rtol=0)
    exact, exact2 = F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k2, v)
    assert not torch.allclose(exact[:, :, :4], exact2[:, :, :4])


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_the_dense_form(causal: bool) -> None:
    q, k, v = (t.requires_grad_() for t in qkv(n=19))
    keep = torch.ones(2, 19, dtype=torch.bool)
    keep[1, 3] = keep[0, 12] = False
    fn = causal_hierarchical_attention if causal else hierarchical_attention
    w = torch.randn(2, 2, 19, 4, dtype=torch.float64)
    rows = (torch.ones if causal else lambda *s, **kw: keep[:, None, :, None].expand(2, 2, 19, 4))(2, 2, 19, 4, dtype=torch.bool)
    grads = torch.autograd.grad((fn(q, k, v, block=2, keep=keep) * w)[rows].sum(), (q, k, v))
    dense = dense_hierarchical_weights(q, k, block=2, causal=causal, keep=keep) @ v
    ref = torch.autograd.grad((dense * w)[rows].sum(), (q, k, v))
    for ours, theirs in zip(grads, ref):
        torch.testing.assert_close(ours, theirs, atol=1e-11, rtol=0)


def test_decoding_rows_equal_whole_sequence_rows() -> None:
    q, k, v = qkv(n=45)
    keep = torch.ones(2, 45, dtype=torch.bool)
    keep[0, :5] = False  # left padding
    full = causal_hierarchical_attention(q, k, v, block=4, keep=keep)
    for n in (1, 3):
        rows = causal_hierarchical_rows(q[:, :, -n:], k, v, block=4, keep=keep)
        torch.testing.assert_close(rows, full[:, :, -n:], atol=1e-12, rtol=0)
        unmasked = causal_hierarchical_attention(q, k, v, block=4)
        torch.testing.assert_close(causal_hierarchical_rows(q[:, :, -n:], k, v, block=4), unmasked[:, :, -n:], atol=1e-12, rtol=0)
    kernel = HierarchicalKernel(4, None)  # a long chunk after a cache
    chunk = kernel(q[:, :, -9:], k, v, mask=keep[:, None, None], causal=True)
    torch.testing.assert_close(chunk, full[:, :, -9:], atol=1e-12, rtol=0)


def test_the_package_non_causal_layer_on_the_same_weights() -> None:
    """h-transformer-1d's HAttention1D, aligned on three points it handles differently:
    (1) it subtracts a separate maximum from each level's logits before adding the levels'
    sums, which rescales the levels against one another: its shift is replaced by zero here
    (exact in float64 at these magnitudes); (2) it counts a coarse key once in the normaliser
    though its value sums 2^l values: a value channel fixed to 1 reads its normaliser, and the
    ratio of its outputs to that channel is the count-weighted result; (3) it stops one level
    short of the whole tree, so `levels` is set to match. No rotary embedding on either side
    (it also rotates the values), a power-of-two length (it pads with attended zeros)."""
    hpkg = pytest.importorskip("h_transformer_1d.h_transformer_1d")
    torch.manual_seed(0)
    dim, heads, dh, r, n = 16, 2, 8, 4, 64
    layer = hpkg.HAttention1D(dim, heads=heads, dim_head=dh, block_size=r).double()
    x = torch.randn(1, n, dim, dtype=torch.float64)
    x[..., -1] = 1.0
    with torch.no_grad():
        for head in range(heads):  # value channel 0 of each head reads the constant feature
            row = 2 * heads * dh + head * dh
            layer.to_qkv.weight[row].zero_()
            layer.to_qkv.weight[row, -1] = 1.0
        layer.to_out.weight.copy_(torch.eye(heads * dh, dtype=torch.float64))
        layer.to_out.bias.zero_()

        class NoShift:  # stands in for torch.max(S, dim, keepdim).values
            def __init__(self, t: torch.Tensor, dim: int, keepdim: bool) -> None:
                self.values = torch.zeros_like(t.sum(dim, keepdim=keepdim))

        with mock.patch.object(torch, "max", NoShift):
            theirs = layer(x).view(1, n, heads, dh).transpose(1, 2)
        q, k, v = (t.view(1, n, heads, dh).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, -1))
        ours = hierarchical_attention(q, k, v, block=r, levels=3)  # the whole tree has 4 levels
    torch.testing.assert_close(theirs[..., 1:] / theirs[..., :1], ours[..., 1:], atol=1e-12, rtol=0)
    whole = hierarchical_attention(q, k, v, block=r)
    assert (whole - ours).abs().max() > 1e-3  # the level it leaves out matters


def tiny(arch: str = "decoder", **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=24, dim=32, num_layers=2, max_seq_len=96, positional={"kind": "rope"},
                                   attention={"kind": "hierarchical", "num_heads": 4, "options": {"block_size": 4, **options}},
                                   head={"kind": "mlm"} if arch == "encoder" else {})).eval()


def test_decoding_through_many_levels_equals_recompute() -> None:
    model = tiny()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    assert generate(model, [prompt], max_new_tokens=40)[0].tolist() == greedy_by_recompute(model, prompt, 40)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_stored_weights_reproduce_the_output(arch: str) -> None:
    """`inspect attention` collects the weights through the explicit path: it must give the
    model the same output as the kernel."""
    from anyformer.nn.attention.context import AttentionContext

    model = tiny(arch)
    layer = next(m for m in model.modules() if hasattr(m, "kernel"))
    x = torch.randn(2, 37, 32)
    pos = torch.arange(37)[None].expand(2, -1)
    keep = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    keep[1, ..., 30:] = False
    for store in (None, []):
        ctx = AttentionContext(q_pos=pos, k_pos=pos, mask=keep, causal=arch == "decoder", store=store)
        with torch.no_grad():
            out = layer(x, ctx)
        if store is None:
            plain = out
    assert len(store) == 1 and store[0].shape == (2, 4, 37, 37)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_declared_keys_match_the_flop_counter(causal: bool) -> None:
    kernel = HierarchicalKernel(4, None)
    for n in (37, 64, 200):
        q, k, v = (t.float() for t in qkv(b=1, h=2, n=n, d=8))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            kernel(q, k, v, causal=causal)
        measured = counter.get_total_flops() / (4 * 2 * 8 * n)  # 2 products x 2 flops x h x d per key
        assert abs(kernel.keys_per_query(n, n, causal) - measured) <= 0.01 * measured, (n, measured)


@pytest.mark.parametrize("levels", [None, 2])
def test_declared_keys_of_decoding_rows_match_the_flop_counter(levels: int | None) -> None:
    """After a cache the kernel computes rows: each new query scores its own block up to itself
    and r pooled keys per level where it is a right child. The declared count, exact for
    every cache length (1 to 3 new queries), and for a longer chunk (computed as the whole
    sequence)."""
    kernel = HierarchicalKernel(4, levels)
    for m in [*range(2, 70), 200]:
        for n in (1, 3, 6):
            if n >= m:
                continue
            q, k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, m, 8), torch.randn(1, 2, m, 8)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                kernel(q, k, v, causal=True)
            measured = counter.get_total_flops() / (4 * 2 * 8 * n)
            assert kernel.keys_per_query(n, m, True) == pytest.approx(measured, rel=1e-9), (m, n, measured)


def test_memory_of_the_scores_grows_linearly() -> None:
    """What autograd keeps for the non-causal form: about 4 r fp32 numbers per query and head
    (the scores of the diagonal, sibling and coarse blocks, their exponentials): at 8x the
    length, 8x the memory within 10%, where exact attention would keep 64x."""
    def saved_bytes(n: int) -> int:
        q, k, v = (torch.randn(1, 1, n, 8, requires_grad=True) for _ in range(3))
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hierarchical_attention(q, k, v, block=8)
        return total

    small, large = saved_bytes(512), saved_bytes(4096)
    assert 7.2 <= large / small <= 8.8, (small, large)


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="block_size must be >= 1"):
        tiny(block_size=0)
    with pytest.raises(ConfigError, match="levels must be >= 1"):
        tiny(levels=0)
    with pytest.raises(ConfigError, match="positional kind 'alibi'"):
        build_model(ModelConfig(vocab_size=24, dim=32, num_layers=1, positional={"kind": "alibi"}, attention={"kind": "hierarchical", "num_heads": 4}))
    cfg = AttentionConfig(kind="hierarchical", num_heads=4)
    with pytest.raises(ConfigError, match="cannot be cross-attention"):
        ATTENTIONS.get("hierarchical")(cfg, BuildContext.standalone(cfg, dim=32, cross=True))
    q, k, v = (t.float() for t in qkv(n=8))
    kernel = HierarchicalKernel(4, None)
    with pytest.raises(ValueError, match="key-padding mask only"):
        kernel(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool).tril()[None, None], causal=False)
    with pytest.raises(ValueError, match="cannot add a bias"):
        kernel(q, k, v, bias=torch.zeros(1, 1, 8, 8), causal=True)
    with pytest.raises(ValueError, match="one sequence against itself"):
        kernel(q[:, :, :3], k, v, causal=False)
    layer = next(m for m in tiny().modules() if hasattr(m, "kernel"))
    with pytest.raises(ValueError, match="rolling"):
        layer.make_cache(CacheSpec(batch=1, max_len=32, window=8))
