"""Selective attention (Leviathan et al. 2024) against the paper's formula written as loops,
against x-transformers' implementation, and cached decoding against full recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import AttentionConfig, ConfigError
from anyformer.generation import generate
from anyformer.nn.attention import ATTENTIONS, AttentionContext
from anyformer.nn.attention.selective import SelectiveKVCache
from anyformer.nn.build_context import BuildContext

B, N, H, G, D = 2, 7, 4, 8, 8  # batch, length, heads, (max) key/value heads, head dim


def layer(num_kv_heads: int, **options: object) -> torch.nn.Module:
    cfg = AttentionConfig(kind="selective", num_heads=H, num_kv_heads=num_kv_heads, head_dim=D, options=dict(options))
    return ATTENTIONS.get("selective")(cfg, BuildContext.standalone(cfg, dim=H * D, causal=True))


def context(b: int, n: int) -> AttentionContext:
    pos = torch.arange(n).expand(b, n)
    return AttentionContext(q_pos=pos, k_pos=pos, causal=True)


def paper_formula(x: torch.Tensor, attn: torch.nn.Module, num_kv_heads: int, head: int, prune: float | None) -> torch.Tensor:
    """The paper's selective attention with explicit loops, in float64, from the layer's weights."""
    x = x.double()
    wq, wk, wv, wo = (p.weight.detach().double() for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    b, n, _ = x.shape
    q = (x @ wq.T).view(b, n, H, D)
    k = (x @ wk.T).view(b, n, num_kv_heads, D)
    v = (x @ wv.T).view(b, n, num_kv_heads, D)
    group = H // num_kv_heads
    out = torch.zeros(b, n, H, D, dtype=torch.float64)
    for bi in range(b):
        logits = [[[float(q[bi, i, hh] @ k[bi, j, hh // group]) / math.sqrt(D) for j in range(n)] for i in range(n)] for hh in range(H)]
        S = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if j < i and j != 0:  # causal, not itself, never the first token
                    S[i][j] = max(0.0, logits[head][i][j])
        F = [[sum(S[r][j] for r in range(i)) for j in range(n)] for i in range(n)]  # rows strictly before i
        for hh in range(H):
            for i in range(n):
                keys = [j for j in range(i + 1) if prune is None or F[i][j] <= prune]
                z = [logits[hh][i][j] - F[i][j] for j in keys]
                top = max(z)
                w = [math.exp(t - top) for t in z]
                total = sum(w)
                for wj, j in zip(w, keys):
                    out[bi, i, hh] += wj / total * v[bi, j, hh // group]
    return out.reshape(b, n, H * D) @ wo.T


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("head,prune", [(0, None), (2, None), (0, 0.3)])
def test_layer_equals_the_paper_formula_written_as_loops(num_kv_heads: int, head: int, prune: float | None) -> None:
    torch.manual_seed(0)
    attn = layer(num_kv_heads, head=head, prune_threshold=prune).double()
    x = 2.0 * torch.randn(B, N, H * D, dtype=torch.float64)  # logits of order one: many positive scores
    with torch.no_grad():
        ours = attn(x, context(B, N))
    torch.testing.assert_close(ours, paper_formula(x, attn, num_kv_heads, head, prune), atol=1e-10, rtol=1e-10)
    if prune is not None:  # the threshold does prune something here, so the test exercises it
        plain = layer(num_kv_heads, head=head).double()
        plain.load_state_dict(attn.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plain(x, context(B, N)), ours)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_matches_x_transformers_selective_attention(num_kv_heads: int) -> None:
    import x_transformers.attend as attend  # the reference implementation (in the test install)
    torch.manual_seed(1)
    q = torch.randn(B, H, N, D)
    k, v = torch.randn(B, num_kv_heads, N, D), torch.randn(B, num_kv_heads, N, D)
    # x-transformers scores from head 0 and zeroes the first query's column: key 0 when n == m,
    # the only case it defines (it disables its KV cache for selective attention). Its grouped
    # heads interleave (query head p reads key/value head p % g; ours: p // (h/g)), so it gets
    # our query heads permuted, head 0 (the selecting head) staying first.
    group = H // num_kv_heads
    perm = torch.tensor([(p % num_kv_heads) * group + p // num_kv_heads for p in range(H)])
    ref, _ = attend.Attend(causal=True, selective=True, heads=H)(q[:, perm], k, v)
    with torch.no_grad():
        ours = layer(num_kv_heads).attend(q, k, v, context(B, N))
    torch.testing.assert_close(ours[:, perm], ref, atol=1e-5, rtol=0)


def model_config(**attention: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=50, dim=32, num_layers=2, max_seq_len=48,
        attention={"kind": "selective", "num_heads": 4, "num_kv_heads": 2, **attention},
    )


def full_recompute_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


def sharpened(model: torch.nn.Module, gain: float = 4.0) -> torch.nn.Module:
    """Larger query weights: larger logits, so selection (and pruning) acts strongly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(gain)
    return model


@pytest.mark.parametrize("options", [{}, {"prune_threshold": 0.5}], ids=["plain", "pruned"])
def test_cached_decoding_equals_full_recompute(options: dict) -> None:
    torch.manual_seed(0)
    model = sharpened(build_model(model_config(options=options)).eval())
    prompt = torch.randint(0, 50, (1, 5))
    ref = full_recompute_greedy(model, prompt, 12)
    for compile in (True, False):
        assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=compile), ref)
    # a prefill in two chunks gives the uncached logits, and the cache holds the selection sums
    tokens = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(1, 48)
        chunked = torch.cat([model(tokens[:, :8], cache), model(tokens[:, 8:], cache)], 1)
        steps = [model(tokens[:, i : i + 1], cache) for i in range(4)]  # then one token at a time
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    layers = list(cache.layers)
    assert all(isinstance(c, SelectiveKVCache) for c in layers)
    assert all(c.selected[:, 24:].eq(0).all() and c.selected[:, 1:24].gt(0).any() for c in layers)
    with torch.no_grad():
        again = model(torch.cat([tokens, tokens[:, :4]], 1))[:, 20:]
    torch.testing.assert_close(torch.cat(steps, 1), again, atol=1e-5, rtol=1e-5)
    fraction = layers[0].pruned_fraction()
    assert (fraction > 0) if options else (fraction == 0)


def test_batched_left_padded_prompts_decode_like_each_alone() -> None:
    torch.manual_seed(0)
    model = sharpened(build_model(model_config()).eval())
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    batch = generate(model, rows, max_new_tokens=8, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = generate(model, row, max_new_tokens=8)
        assert batch[i, -8:].tolist() == alone[0, -8:].tolist()
    # the logits of a left-padded prefill (each row positioned from 0 at its first real token,
    # which selection never masks) equal those of each row alone
    tokens = torch.tensor([[0] * (6 - len(r)) + r for r in rows])
    keep = tokens != 0
    with torch.no_grad():
        cache = model.make_cache(3, 16)
        padded = model(tokens, cache, cache.next_positions(keep), attention_mask=keep)
        for i, row in enumerate(rows):
            torch.testing.assert_close(padded[i, 6 - len(row) :], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)


def test_beam_reorder_moves_the_selection_sums() -> None:
    torch.manual_seed(0)
    model = sharpened(build_model(model_config()).eval())
    tokens = torch.randint(0, 50, (2, 9))
    swap = torch.tensor([1, 0])
    with torch.no_grad():
        cache = model.make_cache(2, 16)
        model(tokens[:, :8], cache)
        cache.reorder(swap)
        step = model(tokens[swap, 8:], cache)
        ref = model(tokens[swap])[:, 8:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_non_causal_stacks_bad_options_and_rolling_caches_are_refused() -> None:
    assert getattr(ATTENTIONS.get("selective"), "causal_only", False)
    with pytest.raises(ConfigError, match="selective attention is causal-only; the 'encoder' stack is not causal"):
        build_model(ModelConfig(arch="encoder", vocab_size=50, dim=32, num_layers=1, attention={"kind": "selective", "num_heads": 4}))
    with pytest.raises(ConfigError, match=r"model.attention.options \(selective\): head is 4; .* 0 .. 3"):
        build_model(model_config(options={"head": 4}))
    with pytest.raises(ConfigError, match="prune_threshold is -1.0"):
        build_model(model_config(options={"prune_threshold": -1.0}))
    with pytest.raises(ConfigError, match="heads"):
        build_model(model_config(options={"heads": 1}))  # unknown option names are refused
    model = build_model(model_config()).eval()
    with pytest.raises(ValueError, match="rolling"):
        model.make_cache(1, window=8)


def test_a_tiny_model_trains() -> None:
    torch.manual_seed(0)
    model = build_model(model_config())
    tokens = torch.randint(0, 50, (4, 24))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_pruned_cache_holds_fewer_keys_and_still_equals_full_recompute(positional: str) -> None:
    """Left-padded rows of a batch prune different keys; the compacted cache addresses keys by
    slot, so positions (RoPE, ALiBi) and padding must follow the keys it kept."""
    torch.manual_seed(0)
    cfg = model_config(options={"prune_threshold": 0.3, "head": 3})  # ALiBi's gentlest head: positive logits
    cfg.positional.kind = positional
    model = sharpened(build_model(cfg).eval())
    rows = [[5] * 6 + list(range(1, 31)), [7, 8, 9] + list(range(10, 28))]
    tokens = torch.tensor([[0] * (36 - len(r)) + r for r in rows])
    keep = tokens != 0
    with torch.no_grad():
        cache = model.make_cache(2, 48)
        outs = [model(tokens[:, :10], cache, cache.next_positions(keep[:, :10]), attention_mask=keep[:, :10])]
        for i in range(10, 36, 3):  # chunks of 3 tokens, then compaction after each
            outs.append(model(tokens[:, i : i + 3], cache, cache.next_positions(keep[:, i : i + 3]), attention_mask=keep[:, i : i + 3]))
        cached = torch.cat(outs, 1)
        for i, row in enumerate(rows):  # each row alone, uncached: the mask does the pruning
            torch.testing.assert_close(cached[i, 36 - len(row) :], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)
    layers = list(cache.layers)
    assert all(c.dropped > 0 and c.start < 36 and c.peak_slots < 36 for c in layers)
    assert all(0 < c.pruned_fraction() < 1 for c in layers)
    assert generate(model, rows, max_new_tokens=6, pad_token_id=0)[1, -6:].tolist() == generate(model, rows[1], max_new_tokens=6)[0, -6:].tolist()


def test_a_beam_reorder_after_pruning_moves_the_compacted_rows() -> None:
    """Rows that pruned different keys, reordered (one duplicated) as a beam step does: each
    continues like its source row alone, uncached (its slots, positions and padding moved)."""
    torch.manual_seed(0)
    model = sharpened(build_model(model_config(options={"prune_threshold": 0.3, "head": 3})).eval())
    rows = [[5] * 6 + list(range(1, 31)), [7, 8, 9] + list(range(10, 28))]
    tokens = torch.tensor([[0] * (36 - len(r)) + r for r in rows])
    keep = tokens != 0
    order = torch.tensor([1, 0, 1])
    with torch.no_grad():
        cache = model.make_cache(2, 48)
        for i in range(0, 30, 6):
            model(tokens[:, i : i + 6], cache, cache.next_positions(keep[:, i : i + 6]), attention_mask=keep[:, i : i + 6])
        assert all(c.dropped > 0 for c in cache.layers)
        cache.reorder(order)
        rest, rest_keep = tokens[order, 30:], keep[order, 30:]
        got = model(rest, cache, cache.next_positions(rest_keep), attention_mask=rest_keep)
        for j, src in enumerate(order.tolist()):
            torch.testing.assert_close(got[j], model(torch.tensor([rows[src]]))[0, -6:], atol=1e-5, rtol=1e-5)


def test_selective_cache_grows_on_demand_and_refuses_past_max_len() -> None:
    cache = SelectiveKVCache(1, 2, 600, 4, dtype=torch.float32)
    assert cache.capacity == SelectiveKVCache.initial_capacity and cache.max_len == 600
    k = torch.randn(1, 2, 300, 4)
    out_k, _ = cache.update(k, k)
    assert cache.capacity == 300 and torch.equal(out_k, k)  # doubling 64 falls short: exactly what is needed
    out_k, _ = cache.update(k, k)
    assert cache.capacity == 600 and torch.equal(out_k[:, :, 300:], k)
    with pytest.raises(ValueError, match="holds 600 positions"):
        cache.update(k[:, :, :1], k[:, :, :1])
