"""The exact kernels agree with each other and with a direct softmax formula, for every mask type."""

import pytest
import torch

from anyformer.nn.attention import KERNELS, causal_mask
from tests.helpers import reference_causal_mask
from anyformer.nn.attention.kernels import attention_weights

B, H, G, N, M, D = 2, 4, 2, 5, 7, 8


def naive(q, k, v, allowed, bias, scale):
    """softmax(q k^T * scale + bias) v over allowed keys, written with loops over heads."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h // groups].T * scale
            if bias is not None:
                s = s + bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[b, h]
            a = allowed.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[b, h]
            for i in range(q.shape[2]):
                if a[i].any():
                    p = torch.softmax(s[i][a[i]], 0)
                    out[b, h, i] = p @ v[b, h // groups][a[i]]
    return out


def masks():
    g = torch.Generator().manual_seed(1)
    adjacency = torch.rand(B, 1, N, M, generator=g) > 0.5
    adjacency[0, 0, 2] = False  # a query with no key to attend
    pad = torch.ones(B, M, dtype=torch.bool)
    pad[1, -3:] = False
    return {
        "none": dict(mask=None, bias=None, causal=False),
        "causal": dict(mask=None, bias=None, causal=True),
        "padding": dict(mask=pad[:, None, None, :], bias=None, causal=False),
        "padding+causal": dict(mask=pad[:, None, None, :], bias=None, causal=True),
        "graph adjacency": dict(mask=adjacency, bias=None, causal=False),
        "additive bias": dict(mask=None, bias=torch.randn(1, H, N, M, generator=g), causal=False),
        "bias+mask+causal": dict(mask=adjacency, bias=torch.randn(B, H, N, M, generator=g), causal=True),
    }


@pytest.mark.parametrize("kernel", KERNELS.names())
@pytest.mark.parametrize("case", list(masks()))
@pytest.mark.parametrize("kv_heads", [H, G, 1])
def test_kernel_matches_naive(kernel, case, kv_heads):
    spec = masks()[case]
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    k = torch.randn(B, kv_heads, M, D, dtype=torch.float64)
    v = torch.randn(B, kv_heads, M, D, dtype=torch.float64)
    allowed = torch.ones(1, 1, N, M, dtype=torch.bool)
    if spec["mask"] is not None:
        allowed = allowed & spec["mask"]
    if spec["causal"]:
        allowed = allowed & reference_causal_mask(N, M)
    want = naive(q, k, v, allowed, spec["bias"], D**-0.5)
    got = KERNELS.get(kernel)(q, k, v, mask=spec["mask"], bias=spec["bias"], causal=spec["causal"])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", list(masks()))
def test_eager_equals_sdpa_fp32_with_gradients(case):
    spec = masks()[case]
    inputs = [torch.randn(B, H, N, D), torch.randn(B, G, M, D), torch.randn(B, G, M, D)]
    outs, grads = [], []
    for name in ("eager", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = KERNELS.get(name)(*leaves, mask=spec["mask"], bias=spec["bias"], causal=spec["causal"], scale=0.3)
        out.square().sum().backward()
        outs.append(out)
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_weights_rows_sum_to_one_or_zero():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 1, :] = False
    w = attention_weights(q, k, mask=mask, causal=True)
    sums = w.sum(-1)
    torch.testing.assert_close(sums[..., 1], torch.zeros(1, 2))
    torch.testing.assert_close(sums[..., [0, 2, 3]], torch.ones(1, 2, 3))
    # causal with 4 queries over 6 keys: query 0 is position 2 and sees keys 0..2 only
    assert (w[..., 0, 3:] == 0).all() and (w[..., 0, :3] > 0).all()


@pytest.mark.parametrize("n,m", [(1, 1), (3, 3), (3, 7), (1, 9), (5, 6)])
def test_causal_mask_puts_the_queries_at_the_end_of_the_keys(n: int, m: int) -> None:
    """With a cache, the n queries are the last n of m positions: query i sees key j iff
    j <= i + (m - n). Written as loops."""
    got = causal_mask(n, m)
    for i in range(n):
        for j in range(m):
            assert bool(got[i, j]) == (j <= i + m - n), (i, j)


@pytest.mark.parametrize("strided", ["k", "v", "both"])
def test_one_query_decoding_with_strided_keys_or_values_equals_the_formula(strided: str) -> None:
    """The one-query CPU path hands unit-stride keys and values to its C++ kernel and anything
    else to torch: a view with a stride along the head dim (every other channel of a wider
    tensor) must give the same attention as the formula."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 8)
    wide_k, wide_v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    k = wide_k[..., ::2] if strided in ("k", "both") else wide_k[..., :8].contiguous()
    v = wide_v[..., ::2] if strided in ("v", "both") else wide_v[..., :8].contiguous()
    assert (k.stride(-1) != 1) == (strided != "v") and (v.stride(-1) != 1) == (strided != "k")
    with torch.no_grad():
        got = KERNELS.get("sdpa")(q, k, v)
    want = naive(q.double(), k.double(), v.double(), torch.ones(1, 1, 1, 9, dtype=torch.bool), None, 8**-0.5)  # 4 query heads share 2
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
