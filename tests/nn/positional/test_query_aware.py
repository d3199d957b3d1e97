"""The query-aware positional hook (PositionalEncoding.query_bias): a relative encoding whose
logit term is computed from each layer's queries is one positional file. Shaw et al. 2018's key
term (q_i . a_clip(j - i), learned, clipped at distance k) is written here, outside the package,
and checked: attention equals the paper's formula written with loops, cached decoding equals
recomputing, its table learns, the chunked kernel takes the term one block at a time (gradients
included), and kernelized attention, which cannot take such a term, says so."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from anyformer import ModelConfig, build_model
from anyformer.generation import generate
from anyformer.nn.attention import AttentionContext, MultiHeadAttention
from anyformer.nn.positional import POSITIONALS, PositionalContext, PositionalEncoding

from tests.helpers import greedy_by_recompute


class ShawKeys(PositionalEncoding):
    """Learned relative embeddings a_r, r = clip(j - i, -k, k), added to the keys in the logits."""

    query_aware = True

    @dataclass
    class Options:
        max_distance: int = 3

    def __init__(self, ctx: PositionalContext, options: "ShawKeys.Options") -> None:
        super().__init__(ctx, options)
        self.table = nn.Parameter(torch.randn(2 * options.max_distance + 1, ctx.head_dim) * 0.5)

    def query_bias(self, q, q_pos, k_pos, scale):  # type: ignore[no-untyped-def]
        k = self.options.max_distance
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-k, k) + k  # (b, n, m)
        return torch.einsum("bhnd,bnmd->bhnm", q.float(), self.table[rel].float()) * scale


if "test_shaw_keys" not in POSITIONALS:
    POSITIONALS.register("test_shaw_keys")(ShawKeys)


def naive(layer: MultiHeadAttention, table: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Causal self-attention with Shaw's key term, one (query, key) pair at a time, float64."""
    b, n, _ = x.shape
    h, d = layer.num_heads, layer.head_dim
    x, table = x.detach().double(), table.detach()
    q, kk, v = (proj.weight.double() @ x.transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, kk, v = (t.detach() for t in (q, kk, v))  # (b, h*d, n)
    q, kk, v = (t.view(b, h, d, n) for t in (q, kk, v))
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                logits = []
                for j in range(i + 1):
                    a = table[max(-k, min(k, j - i)) + k].double()
                    logits.append(float(q[bi, hi, :, i] @ (kk[bi, hi, :, j] + a)) / math.sqrt(d))
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[bi, hi, i] = sum(p[j] * v[bi, hi, :, j] for j in range(i + 1))
    merged = out.transpose(1, 2).reshape(b, n, h * d)
    return merged @ layer.o_proj.weight.detach().double().T


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "chunked"])
def test_attention_equals_the_formula_with_loops(kernel: str) -> None:
    from anyformer.nn.attention import KERNELS

    torch.manual_seed(0)
    layer = MultiHeadAttention.standard(16, 2, kernel=KERNELS.get(kernel)).eval()
    shaw = ShawKeys(PositionalContext(16, 2, 8, 32, True), ShawKeys.Options(max_distance=2))
    x = torch.randn(2, 7, 16)
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ours = layer(x, AttentionContext(q_pos=pos, k_pos=pos, positional=shaw, causal=True))
    assert torch.allclose(ours.double(), naive(layer, shaw.table.detach(), x, 2), atol=1e-5)


def model(kernel: str = "sdpa", kind: str = "mha") -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=24, dim=32, num_layers=2, max_seq_len=48, attention={"num_heads": 4, "kernel": kernel, "kind": kind},
                                   positional={"kind": "test_shaw_keys", "options": {"max_distance": 4}}))


@pytest.mark.parametrize("kernel", ["sdpa", "chunked"])
def test_cached_decoding_equals_recompute(kernel: str) -> None:
    m = model(kernel).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert generate(m, [prompt], max_new_tokens=16)[0].tolist() == greedy_by_recompute(m, prompt, 16)


@pytest.mark.parametrize("kernel", ["sdpa", "chunked"])
def test_its_table_learns(kernel: str) -> None:
    m = model(kernel)
    tokens = torch.randint(0, 24, (2, 16))
    loss = torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    tables = [p for name, p in m.named_parameters() if name.endswith("table")]
    assert tables and all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)


def test_kernelized_attention_says_it_cannot_take_the_term() -> None:
    tokens = torch.randint(0, 24, (1, 8))
    with pytest.raises(ValueError, match="kernelized attention cannot fold"):
        model(kind="linear")(tokens)


class RecordingShaw(ShawKeys):
    """ShawKeys that records the (queries, keys) extent of every term it is asked for."""

    def __init__(self, ctx: PositionalContext, options: "ShawKeys.Options") -> None:
        super().__init__(ctx, options)
        self.extents: list[tuple[int, int]] = []

    def query_bias(self, q, q_pos, k_pos, scale):  # type: ignore[no-untyped-def]
        self.extents.append((q_pos.shape[1], k_pos.shape[1]))
        return super().query_bias(q, q_pos, k_pos, scale)


def test_chunked_kernel_takes_the_term_per_block_with_gradients() -> None:
    """Several query and key blocks, grouped heads, queries the last n of m keys, causal: the
    output and the gradients of q, k, v and the table equal dense attention with the term added
    to the whole logit matrix (float64), and the term is never asked for more than one block."""
    from anyformer.nn.attention.block_bias import PositionalBlockBias
    from anyformer.nn.attention.chunked import chunked_attention

    torch.manual_seed(1)
    b, h, g, n, m, d, dist, scale = 2, 4, 2, 10, 13, 8, 3, 0.3
    shaw = RecordingShaw(PositionalContext(h * d, h, d, 32, True), ShawKeys.Options(max_distance=dist))
    q = torch.randn(b, h, n, d, requires_grad=True)
    k, v = (torch.randn(b, g, m, d, requires_grad=True) for _ in range(2))
    k_pos = torch.arange(m).expand(b, m) + torch.tensor([[0], [5]])  # rows start at different positions
    q_pos = k_pos[:, m - n:]
    out = chunked_attention(q, k, v, causal=True, scale=scale, q_block=3, k_block=4,
                            block_bias=PositionalBlockBias(shaw, q_pos, k_pos, scale))
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v, shaw.table), grad_out)
    assert shaw.extents and max(e[0] for e in shaw.extents) <= 3 and max(e[1] for e in shaw.extents) <= 4

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    table64 = shaw.table.detach().double().requires_grad_()
    rel = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(-dist, dist) + dist  # (b, n, m)
    kk, vv = (t.repeat_interleave(h // g, dim=1) for t in (k64, v64))
    logits = (q64 @ kk.transpose(-1, -2) + torch.einsum("bhnd,bnmd->bhnm", q64, table64[rel])) * scale
    visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    ref = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ vv
    refs = torch.autograd.grad(ref, (q64, k64, v64, table64), grad_out.double())
    assert torch.allclose(out.double(), ref, atol=1e-5)
    for name, a, r in zip(("q", "k", "v", "table"), ours, refs):
        assert torch.allclose(a.double(), r, atol=1e-4), name
