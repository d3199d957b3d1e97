"""The caches of anyformer/nn/kv_cache.py against their rules written as plain Python lists: a
rolling cache holds the first `sinks` tokens and the last `window` once full, whatever the
chunk sizes; slot positions count the real tokens kept; the position a cache promises for new
tokens is the one it then assigns."""

from __future__ import annotations

import pytest
import torch

from anyformer.nn.kv_cache import CrossKVCache, KVCache, LambdaKVCache, LambdaModelCache, ModelCache, RollingKVCache, RollingModelCache, match_cache_dtype

CHUNKS = [3, 1, 4, 1, 5, 2, 6, 1, 1, 3]


@pytest.mark.parametrize("sinks, window", [(0, 6), (2, 6), (3, 1)])
def test_a_rolling_cache_keeps_the_sinks_and_the_last_window(sinks: int, window: int) -> None:
    cache = RollingKVCache(2, 3, 4, sinks=sinks, window=window, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    seen_k: list[torch.Tensor] = []
    seen_v: list[torch.Tensor] = []
    for n in (min(c, window) for c in CHUNKS):
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        seen_k += list(k.unbind(2))
        seen_v += list(v.unbind(2))
        got_k, got_v = cache.update(k, v)
        total = len(seen_k)
        kept = list(range(total)) if total <= sinks + window else [*range(sinks), *range(total - window, total)]
        torch.testing.assert_close(got_k, torch.stack([seen_k[i] for i in kept], 2), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.stack([seen_v[i] for i in kept], 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"at most {window} tokens per call"):
        cache.update(torch.zeros(2, 3, window + 1, 4), torch.zeros(2, 3, window + 1, 4))


@pytest.mark.parametrize("rolling", [False, True])
def test_positions_count_the_real_tokens_and_are_the_ones_promised(rolling: bool) -> None:
    """Row 1 is left-padded by two tokens: its positions start at 0 at its first real token.
    Each chunk's `next_positions` equals the positions `append_positions` then gives those
    tokens, and every slot's position is the number of real tokens kept before it."""
    sinks, window = 2, 5
    if rolling:
        cache = RollingModelCache([RollingKVCache(2, 1, 4, sinks=sinks, window=window, dtype=torch.float32)], sinks=sinks, window=window)
    else:
        cache = ModelCache([KVCache(2, 1, 64, 4, dtype=torch.float32)])
    kept_flags: list[list[bool]] = [[], []]
    first = True
    chunks = [min(c, window) for c in CHUNKS]
    for n in chunks:
        keep = torch.ones(2, n, dtype=torch.bool)
        if first:
            keep[1, :2] = False
            first = False
        promised = cache.next_positions(keep)
        positions, slots_keep = cache.append_positions(promised, keep)
        torch.testing.assert_close(positions[:, -n:], promised)
        for row in range(2):
            kept_flags[row] += keep[row].tolist()
            flags = kept_flags[row]
            if rolling and len(flags) > sinks + window:
                flags = flags[:sinks] + flags[len(flags) - window :]
            assert slots_keep[row].tolist() == flags
            want = [max(0, sum(flags[: i + 1]) - 1) for i in range(len(flags))]  # real tokens kept up to each slot, less one
            assert positions[row].tolist() == want, (row, positions[row].tolist(), want)
    assert cache.length == (sinks + window if rolling else sum(chunks))


def test_a_lambda_cache_keeps_the_sinks_and_what_the_next_queries_may_see() -> None:
    """Before each call of up to `window` tokens (exactly `window` allowed), the Λ cache keeps
    the first `sinks` tokens and the `window` - 1 most recent ones; positions are true
    positions, evicted tokens counted."""
    sinks, window = 2, 4
    layer = LambdaKVCache(1, 1, 2, sinks=sinks, window=window, dtype=torch.float32)
    cache = LambdaModelCache([layer], sinks=sinks, window=window)
    seen = 0
    for n in [4, 1, 3, 4, 2, 4]:
        before = list(range(seen)) if seen <= sinks + window - 1 else [*range(sinks), *range(seen - window + 1, seen)]
        kept = before + list(range(seen, seen + n))
        k = torch.arange(seen, seen + n, dtype=torch.float32).reshape(1, 1, n, 1).expand(1, 1, n, 2)
        got_k, _ = layer.update(k, k)
        keep = torch.ones(1, n, dtype=torch.bool)
        positions, _ = cache.append_positions(cache.next_positions(keep), keep)
        assert got_k[0, 0, :, 0].tolist() == [float(i) for i in kept]
        assert positions[0].tolist() == kept
        seen += n
    with pytest.raises(ValueError, match=f"at most {window} tokens per call"):
        layer.update(torch.zeros(1, 1, window + 1, 2), torch.zeros(1, 1, window + 1, 2))


@pytest.mark.parametrize("cls", [KVCache, RollingKVCache])
def test_a_reorder_moves_whole_rows_of_keys_and_values(cls) -> None:  # type: ignore[no-untyped-def]
    """Beam search's reorder (2, 0, 0) of a batch of 3: each row's keys and values, every head
    and position, come from the row named (batch, heads and length kept apart by using 3 rows,
    2 heads and 6 positions)."""
    cache = KVCache(3, 2, 6, 4, dtype=torch.float32) if cls is KVCache else RollingKVCache(3, 2, 4, dtype=torch.float32, sinks=1, window=4)
    for _ in range(2):  # 6 tokens: the rolling cache has already dropped one
        cache.update(torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4))
    keys, values = cache.k.clone(), cache.v.clone()
    order = torch.tensor([2, 0, 0])
    cache.reorder(order)
    assert torch.equal(cache.k, keys[order]) and torch.equal(cache.v, values[order])


def test_a_wider_cache_meets_the_queries_in_one_dtype() -> None:
    """A bf16 model with an fp32 cache: one decoding query is widened to the cache's fp32 (the
    cached keys stay exact), a multi-token call narrows the keys and values to bf16; equal
    dtypes pass through untouched."""
    k = v = torch.randn(1, 2, 6, 4)
    one, many = torch.randn(1, 2, 1, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    assert [t.dtype for t in match_cache_dtype(one, k, v)] == [torch.float32] * 3
    assert [t.dtype for t in match_cache_dtype(many, k, v)] == [torch.bfloat16] * 3
    q = torch.randn(1, 2, 3, 4)
    assert all(a is b for a, b in zip(match_cache_dtype(q, k, v), (q, k, v)))


def test_a_model_cache_keeps_its_cross_attention_caches() -> None:
    """An encoder-decoder's cache: one self-attention cache and one cross-attention cache per
    decoder layer, both held by the model's cache."""
    layers = [KVCache(2, 1, 4, 2, dtype=torch.float32) for _ in range(2)]
    cross = [CrossKVCache() for _ in range(2)]
    cache = ModelCache(layers, cross)
    assert list(cache.cross) == cross and list(cache.layers) == layers


@pytest.mark.parametrize("rolling", [False, True])
def test_tokens_appended_without_a_mask_are_all_kept(rolling: bool) -> None:
    """A decoding call with no padding passes no mask (attention_mask=None): its tokens are kept
    and numbered on from the cached ones, in the rolling cache after its eviction too."""
    if rolling:
        cache = RollingModelCache([RollingKVCache(2, 1, 4, sinks=1, window=3, dtype=torch.float32)], sinks=1, window=3)
    else:
        cache = ModelCache([KVCache(2, 1, 8, 4, dtype=torch.float32)])
    for _ in range(2):
        positions, keep = cache.append_positions(cache.next_positions(torch.ones(2, 3, dtype=torch.bool)), None)
    assert bool(keep.all()) and positions.tolist() == ([[0, 1, 2, 3]] * 2 if rolling else [[0, 1, 2, 3, 4, 5]] * 2)
