"""Known values of the positional tables whose other tests are properties or parity at their
default settings: T5's buckets against values worked out by hand from the paper's rule, RoPE's
angles at a non-default base and fraction against numbers written out, the learnable
sinusoidal encoding against its formula in numpy at a non-default base, the learned table's
offset. Each pins a number a wrong constant would change."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyformer.nn.positional import POSITIONALS, PositionalContext
from anyformer.nn.positional.bias import t5_bucket
from anyformer.nn.positional.rope import apply_rope, rope_angles


def ctx(dim: int = 8, heads: int = 1, causal: bool = False) -> PositionalContext:
    return PositionalContext(dim=dim, num_heads=heads, head_dim=dim // heads, max_seq_len=64, causal=causal)


# (key - query offset, bucket). Bidirectional, 32 buckets, max distance 128: 16 per direction,
# the first 8 exact, then 8 log-spaced up to 128 (bucket 8 + floor(log(n / 8) / log(16) * 8)),
# keys after the query offset by 16. One-sided (causal), 32 buckets: the past only, 16 exact,
# then 16 log-spaced (16 + floor(log(n / 16) / log(8) * 16)); the future is bucket 0.
BIDIRECTIONAL = [(0, 0), (-1, 1), (1, 17), (-7, 7), (7, 23), (-8, 8), (8, 24), (-11, 8), (-20, 10), (-32, 12),
                 (-64, 14), (-127, 15), (-128, 15), (-1000, 15), (1000, 31), (20, 26)]
ONE_SIDED = [(0, 0), (5, 0), (-5, 5), (-15, 15), (-16, 16), (-20, 17), (-32, 21), (-64, 26), (-127, 31), (-500, 31)]


@pytest.mark.parametrize("bidirectional, table", [(True, BIDIRECTIONAL), (False, ONE_SIDED)])
def test_t5_buckets_are_the_worked_out_values(bidirectional: bool, table: list[tuple[int, int]]) -> None:
    offsets = torch.tensor([[[d for d, _ in table]]])
    got = t5_bucket(offsets, bidirectional=bidirectional, num_buckets=32, max_distance=128)[0, 0].tolist()
    assert got == [b for _, b in table]


def test_t5_buckets_at_other_sizes_follow_the_rule_written_in_python() -> None:
    def bucket(rel: int, buckets: int, max_distance: int) -> int:  # bidirectional
        half = buckets // 2
        out, n = (half if rel > 0 else 0), abs(rel)
        exact = half // 2
        if n < exact:
            return out + n
        return out + min(half - 1, exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact)))

    rel = torch.arange(-300, 301)[None, None]
    got = t5_bucket(rel, bidirectional=True, num_buckets=64, max_distance=256)[0, 0].tolist()
    assert got == [bucket(r, 64, 256) for r in range(-300, 301)]


def test_rope_angles_at_a_set_base_are_position_times_base_to_the_minus_2i_over_r() -> None:
    cos, sin = rope_angles(torch.tensor([[3]]), 4, 100.0)  # inverse frequencies 1 and 100^-1/2 = 0.1
    angles = [3.0, 0.3, 3.0, 0.3]
    assert torch.allclose(cos[0, 0, 0], torch.tensor([math.cos(a) for a in angles]), atol=1e-6)
    assert torch.allclose(sin[0, 0, 0], torch.tensor([math.sin(a) for a in angles]), atol=1e-6)


def test_rope_with_a_fraction_rotates_pairs_i_and_i_plus_r_over_2_and_leaves_the_rest() -> None:
    rope = POSITIONALS.get("rope")(ctx(8), POSITIONALS.get("rope").Options(base=100.0, fraction=0.5))
    assert rope.rotary_dim == 4
    x = torch.arange(1.0, 9.0)[None, None, None]  # (1, 1, 1, 8): channels 1..8
    q, _ = rope.rotate(x, x, torch.tensor([[2]]), torch.tensor([[2]]))
    a0, a1 = 2.0, 0.2  # position 2 times 1 and 0.1
    want = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
            3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1), 5, 6, 7, 8]
    assert torch.allclose(q[0, 0, 0], torch.tensor(want), atol=1e-5)


def test_rope_scores_depend_on_the_distance_as_cos_of_distance_times_frequency() -> None:
    cos_q, sin_q = rope_angles(torch.tensor([[7]]), 2, 10000.0)
    cos_k, sin_k = rope_angles(torch.tensor([[3]]), 2, 10000.0)
    e = torch.tensor([1.0, 0.0])[None, None, None]
    score = (apply_rope(e, cos_q, sin_q) * apply_rope(e, cos_k, sin_k)).sum()
    assert abs(float(score) - math.cos(4.0)) < 1e-6  # frequency 1 for the first pair: cos((7 - 3) * 1)


def test_t5_bias_reads_the_bucket_of_the_key_minus_the_query() -> None:
    """The bias of query i for key j is the learned table's entry of bucket(j - i): a query at
    position 20 and keys at 0-40 read the buckets of the offsets -20..20 (the worked-out list
    above: -20 -> 10, -7 -> 7, 1 -> 17, 20 -> 26)."""
    kind = POSITIONALS.get("t5")
    enc = kind(ctx(8, heads=2), kind.Options(num_buckets=32, max_distance=128))
    with torch.no_grad():
        enc.table.weight.copy_(torch.arange(64, dtype=torch.float32).view(32, 2))
        bias = enc.bias(torch.tensor([[20]]), torch.arange(41)[None])  # (b, h, n, m)
    assert bias.shape == (1, 2, 1, 41)
    for offset, bucket in [(-20, 10), (-7, 7), (0, 0), (1, 17), (20, 26)]:
        assert bias[0, :, 0, 20 + offset].tolist() == enc.table.weight[bucket].tolist(), (offset, bucket)


def test_the_fixed_sinusoidal_encoding_adds_the_papers_table_in_numpy() -> None:
    """PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i + 1) = cos(p / base^(2i/d)) (Vaswani et al. 2017)
    added to the embeddings, at base 50, width 6, positions 0-8."""
    kind = POSITIONALS.get("sinusoidal")
    enc = kind(ctx(6), kind.Options(base=50.0))
    table = np.array([[math.sin(p / 50.0 ** (2 * (c // 2) / 6)) if c % 2 == 0 else math.cos(p / 50.0 ** (2 * (c // 2) / 6))
                       for c in range(6)] for p in range(9)])
    x = torch.randn(1, 9, 6)
    got = enc.embed(x, torch.arange(9)[None])
    np.testing.assert_allclose((got - x)[0].double().numpy(), table, atol=1e-6)


def test_learnable_sinusoidal_is_its_feed_forward_of_the_sinusoids_in_numpy() -> None:
    torch.manual_seed(0)
    kind = POSITIONALS.get("learnable_sinusoidal")
    enc = kind(ctx(6), kind.Options(hidden=5, base=50.0))
    positions = np.arange(9)
    table = np.zeros((9, 6))
    for p in positions:
        for c in range(6):
            angle = p / 50.0 ** (2 * (c // 2) / 6)
            table[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    w1, b1 = enc.ffn[0].weight.detach().double().numpy(), enc.ffn[0].bias.detach().double().numpy()
    w2, b2 = enc.ffn[2].weight.detach().double().numpy(), enc.ffn[2].bias.detach().double().numpy()
    h = table @ w1.T + b1
    gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    want = gelu @ w2.T + b2
    with torch.no_grad():
        got = enc.encoding(torch.tensor(positions)[None])[0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    x = torch.randn(1, 9, 6)
    with torch.no_grad():
        assert torch.allclose(enc.embed(x, torch.arange(9)[None]), x + torch.tensor(want, dtype=torch.float32), atol=1e-5)


def test_the_learned_table_is_read_at_position_plus_offset() -> None:
    kind = POSITIONALS.get("learned")
    enc = kind(ctx(4), kind.Options(offset=2))  # OPT and BART read their table two rows on
    x = torch.zeros(1, 3, 4)
    out = enc.embed(x, torch.tensor([[0, 1, 5]]))
    assert torch.equal(out[0], enc.table.weight.detach()[[2, 3, 7]])


@pytest.mark.parametrize("queries, keys, limit, rows", [
    (1, 10, 4, 5),  # one query at the end: distances -9..0, clipped to -4..0
    (10, 10, 4, 9),  # -9..9 clipped to -4..4
    (10, 10, 100, 19),  # -9..9, nothing clipped
    (3, 10, 100, 12),  # the last 3 queries: -9..2
    (1, 1, 4, 1),  # one query, one key: distance 0
])
def test_the_distance_span_counts_the_clipped_distances(queries: int, keys: int, limit: int, rows: int) -> None:
    from anyformer.nn.positional.relative import distance_span

    assert distance_span(queries, keys, limit) == rows
