"""Sparse attention kinds: each pattern equals naive attention with the equivalent dense mask
(written out here from the papers' definitions), block skipping never drops a visible key,
and every kind trains and decodes with a KV cache like without one."""

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.attention.chunked import chunked_attention
from anyformer.nn.attention.kernels import eager_attention
from anyformer.nn.attention.patterns import FULL, NONE, BlockLocal, Dilated, Fixed, LambdaShaped, Strided, Window
from tests.helpers import build

SPARSE_KINDS = ["sliding_window", "strided", "fixed", "block_local", "dilated", "lambda_shaped"]


def reference_mask(kind: str, n: int, m: int) -> torch.Tensor:
    """The (n, m) mask of each pattern, element by element; query i sits at index i + m - n."""
    out = torch.zeros(n, m, dtype=torch.bool)
    for a in range(n):
        i = a + m - n
        for j in range(m):
            if kind == "sliding_window":  # window 6
                ok = abs(i - j) < 6
            elif kind == "strided":  # stride 5: local + every 5th
                ok = abs(i - j) < 5 or (i - j) % 5 == 0
            elif kind == "fixed":  # stride 8, 2 summary keys at the end of each block
                ok = i // 8 == j // 8 or j % 8 >= 6
            elif kind == "block_local":  # blocks of 7
                ok = i // 7 == j // 7
            elif kind == "dilated":  # 3 keys each side, every 2nd
                ok = abs(i - j) < 6 and (i - j) % 2 == 0
            else:  # lambda_shaped: 3 first keys + window 5
                ok = j < 3 or abs(i - j) < 5
            out[a, j] = ok
    return out


PATTERNS = {
    "sliding_window": Window(6),
    "strided": Strided(5),
    "fixed": Fixed(8, 2),
    "block_local": BlockLocal(7),
    "dilated": Dilated(3, 2),
    "lambda_shaped": LambdaShaped(5, 3),
}
OPTIONS = {
    "sliding_window": dict(window=6),
    "strided": dict(stride=5),
    "fixed": dict(stride=8, num_summary=2),
    "block_local": dict(block=7),
    "dilated": dict(window=3, dilation=2),
    "lambda_shaped": dict(window=5, num_global=3),
}


def test_every_sparse_kind_is_registered():
    assert set(SPARSE_KINDS) <= set(ATTENTIONS.names())


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_pattern_mask_matches_definition(kind):
    for n, m in [(30, 30), (9, 41)]:
        torch.testing.assert_close(PATTERNS[kind].dense(n, m), reference_mask(kind, n, m))


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_block_states_are_conservative(kind):
    pattern = PATTERNS[kind]
    full = pattern.dense(64, 64)
    for bn, bm in [(4, 4), (5, 9), (16, 8)]:
        for q0 in range(0, 64, bn):
            for k0 in range(0, 64, bm):
                q1, k1 = min(q0 + bn, 64), min(k0 + bm, 64)
                state, block = pattern.block_state(q0, q1, k0, k1), full[q0:q1, k0:k1]
                if state == NONE:
                    assert not block.any()
                if state == FULL:
                    assert block.all()


@pytest.mark.parametrize("kind", SPARSE_KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nm", [(40, 40), (13, 50)])
def test_block_sparse_equals_naive_with_dense_mask(kind, causal, nm):
    n, m = nm
    q = torch.randn(2, 4, n, 8, requires_grad=True)
    k = torch.randn(2, 2, m, 8, requires_grad=True)
    v = torch.randn(2, 2, m, 8, requires_grad=True)
    got = chunked_attention(q, k, v, causal=causal, pattern=PATTERNS[kind], q_block=8, k_block=8)
    want = eager_attention(q, k, v, mask=reference_mask(kind, n, m), causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    up = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * up).sum(), [q, k, v]), torch.autograd.grad((want * up).sum(), [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def sparse_model(kind: str, **extra):
    return build("decoder", seed=1, attention__kind=kind, attention__options=dict(OPTIONS[kind], q_block=4, k_block=8, **extra),
                 positional__kind="alibi", attention__num_kv_heads=2)


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_model_matches_dense_mask_trains_and_decodes_with_cache(kind):
    tokens = torch.randint(0, 97, (2, 30))
    model = sparse_model(kind)
    dense = sparse_model(kind, dense=True)  # the same weights, pattern applied as a dense mask
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(full, dense(tokens), atol=1e-5, rtol=0)
        cache = model.make_cache(2, 30)
        steps = [model(tokens[:, :11], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # one training step: every parameter gets a finite gradient and the loss goes down
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_attention_store_reports_the_pattern(kind):
    model = sparse_model(kind)
    store: list = []
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 20)), attn_store=store)
    visible = store[0][0, 0] > 0
    allowed = reference_mask(kind, 20, 20) & torch.ones(20, 20, dtype=torch.bool).tril()
    assert not (visible & ~allowed).any()


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="window"):
        build("decoder", attention__kind="sliding_window", attention__options=dict(window=0))
    with pytest.raises(ConfigError, match="windw"):
        build("decoder", attention__kind="sliding_window", attention__options=dict(windw=4))
    with pytest.raises(ConfigError, match="num_summary"):
        build("decoder", attention__kind="fixed", attention__options=dict(stride=4, num_summary=5))


def test_keys_per_query_of_one_query_is_the_keys_it_sees() -> None:
    from anyformer.nn.attention.patterns import Pattern, Window

    assert Pattern().keys_per_query(1, 10, causal=False) == 10.0  # one query sees all 10 keys
    assert Pattern().keys_per_query(4, 10, causal=True) == (7 + 8 + 9 + 10) / 4
    assert Window(3).keys_per_query(1, 10, causal=True) == 3.0


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_stored_weights_are_the_softmax_under_the_pattern(kind):
    """The weights `inspect attention` shows for a sparse kind: softmax(q k^T / sqrt(d)) over the
    keys the pattern (and causality) leave, for 5 queries after a cache of 8 keys (n, m and the
    head width all differ)."""
    from anyformer.nn.attention.chunked import ChunkedKernel

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 13, 4, generator=g)
    visible = reference_mask(kind, 5, 13) & torch.ones(5, 13, dtype=torch.bool).tril(8)
    logits = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~visible, float("-inf"))
    got = ChunkedKernel(PATTERNS[kind]).weights(q, k, causal=True)
    torch.testing.assert_close(got, logits.softmax(-1), atol=1e-6, rtol=1e-5)
