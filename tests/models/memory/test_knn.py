"""kNN memory retrieval (model.memory.kind=knn): with the whole history in memory and exact
search it is attention over the concatenated history (joint softmax), or over the history alone
(gate fixed to the memory); top-k against a naive sort; equal to memorizing-transformers-pytorch's
KNNAttention on the same weights; faiss search against torch's; eviction, document boundaries,
decoding, training and resuming, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from anyformer.config import ConfigError
from anyformer.models.memory.knn import KNNMemoryOptions, Memory, Search, retrieval_attention
from anyformer.nn.attention.mha import MultiHeadAttention
from anyformer.training import Trainer

from tests.helpers import assert_decoding_in_chunks_equals_forward, assert_reordered_cache_continues, build
from tests.training_helpers import interrupted_copy, tiny_config

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed")


def naive_attention(q, keys, values, visible, scale):  # type: ignore[no-untyped-def]
    """softmax(q k / sqrt(d)) v over the keys each query may see, written out per query:
    q (h, n, d), keys/values (h, m, d), visible (n, m) bool."""
    out = torch.zeros(q.shape[0], q.shape[1], values.shape[-1], dtype=torch.float64)
    for head in range(q.shape[0]):
        for i in range(q.shape[1]):
            idx = torch.nonzero(visible[i]).flatten()
            w = torch.softmax((keys[head, idx].double() @ q[head, i].double()) * scale, 0)
            out[head, i] = w @ values[head, idx].double()
    return out


def memory_of(keys, values, capacity):  # type: ignore[no-untyped-def]
    mem = Memory(capacity)
    mem.add(keys, values, torch.zeros(keys.shape[0], keys.shape[2], dtype=torch.long))
    return mem


def sample(b=2, h=4, g=2, n=6, hist=10, d=8, seed=0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, g, n, d), torch.randn(b, g, n, d)
    hk, hv = torch.randn(b, g, hist, d), torch.randn(b, g, hist, d)
    return q, k, v, hk, hv


def search(kind="torch", **options):  # type: ignore[no-untyped-def]
    return Search(KNNMemoryOptions(search=kind, **options))


def test_the_joint_softmax_over_the_whole_history_is_attention_over_the_concatenation() -> None:
    q, k, v, hk, hv = sample()
    b, h, n, d = q.shape
    mem = memory_of(hk, hv, capacity=16)  # 10 entries held, 6 slots empty
    docs = torch.zeros(b, n, dtype=torch.long)
    out = retrieval_attention(q, k, v, mem, docs, search(), top_k=16, gate=torch.zeros(h), combine="joint")
    keys, values = torch.cat([hk, k], 2).repeat_interleave(h // 2, 1), torch.cat([hv, v], 2).repeat_interleave(h // 2, 1)
    visible = torch.cat([torch.ones(n, 10, dtype=torch.bool), torch.ones(n, n).tril().bool()], 1)  # history, then causal
    for r in range(b):
        torch.testing.assert_close(out[r].double(), naive_attention(q[r], keys[r], values[r], visible, d**-0.5), atol=1e-5, rtol=1e-5)


def test_the_gate_mixes_memory_and_local_attention_and_fixed_open_is_attention_over_the_history() -> None:
    q, k, v, hk, hv = sample(seed=1)
    b, h, n, d = q.shape
    mem = memory_of(hk, hv, capacity=10)
    docs = torch.zeros(b, n, dtype=torch.long)
    gate = torch.tensor([-1.0, 0.0, 0.5, 40.0])  # the last head: the memory alone
    out = retrieval_attention(q, k, v, mem, docs, search(), top_k=10, gate=gate, combine="gate")
    keys_h, values_h = hk.repeat_interleave(2, 1), hv.repeat_interleave(2, 1)
    k_loc, v_loc = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for r in range(b):
        past = naive_attention(q[r], keys_h[r], values_h[r], torch.ones(n, 10, dtype=torch.bool), d**-0.5)
        local = naive_attention(q[r], k_loc[r], v_loc[r], torch.ones(n, n).tril().bool(), d**-0.5)
        g = torch.sigmoid(gate.double())[:, None, None]
        torch.testing.assert_close(out[r].double(), g * past + (1 - g) * local, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[r, 3].double(), past[3], atol=1e-5, rtol=1e-5)


def test_top_k_keeps_each_querys_best_entries() -> None:
    q, k, v, hk, hv = sample(hist=12, seed=2)
    b, h, n, d = q.shape
    mem = memory_of(hk, hv, capacity=12)
    out = retrieval_attention(q, k, v, mem, torch.zeros(b, n, dtype=torch.long), search(), top_k=3, gate=torch.zeros(h), combine="joint")
    keys_h, values_h = hk.repeat_interleave(2, 1), hv.repeat_interleave(2, 1)
    k_loc, v_loc = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for r in range(b):
        for head in range(h):
            for i in range(n):
                best = sorted(range(12), key=lambda j: -float(keys_h[r, head, j] @ q[r, head, i]))[:3]
                keys = torch.cat([keys_h[r, head, best], k_loc[r, head, : i + 1]])
                values = torch.cat([values_h[r, head, best], v_loc[r, head, : i + 1]])
                w = torch.softmax((keys.double() @ q[r, head, i].double()) * d**-0.5, 0)
                torch.testing.assert_close(out[r, head, i].double(), w @ values.double(), atol=1e-5, rtol=1e-5)


def test_entries_of_another_document_are_never_retrieved() -> None:
    q, k, v, hk, hv = sample(b=1, seed=3)
    n, d = q.shape[2], q.shape[3]
    mem = Memory(10)
    mem.add(hk, hv, torch.tensor([[0] * 4 + [1] * 6]))  # the first 4 entries from an earlier document
    docs = torch.tensor([[1, 1, 1, 2, 2, 2]])  # a new document starts at the fourth query
    out = retrieval_attention(q, k, v, mem, docs, search(), top_k=10, gate=torch.zeros(4), combine="joint")
    keys, values = torch.cat([hk, k], 2).repeat_interleave(2, 1)[0], torch.cat([hv, v], 2).repeat_interleave(2, 1)[0]
    visible = torch.zeros(n, 10 + n, dtype=torch.bool)
    visible[:3, 4:10] = True  # document 1's entries, for document 1's queries only
    visible[:, 10:] = torch.ones(n, n).tril().bool()
    torch.testing.assert_close(out[0].double(), naive_attention(q[0], keys, values, visible, d**-0.5), atol=1e-5, rtol=1e-5)


def test_the_memory_evicts_its_oldest_entries_and_clears_earlier_documents() -> None:
    mem = Memory(5)
    keys = torch.arange(8.0).view(1, 1, 8, 1)
    mem.add(keys[:, :, :3], keys[:, :, :3], torch.zeros(1, 3, dtype=torch.long))
    mem.add(keys[:, :, 3:], keys[:, :, 3:], torch.zeros(1, 5, dtype=torch.long))
    assert sorted(mem.keys.flatten().tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]  # 0, 1 and 2 evicted: the oldest
    mem.add(keys[:, :, :2] + 10, keys[:, :, :2], torch.ones(1, 2, dtype=torch.long))
    mem.clear_before(torch.tensor([1]))
    assert sorted(mem.keys[0, 0, mem.docs[0] >= 0].flatten().tolist()) == [10.0, 11.0]
    mem.add(keys[:, :, :7] + 20, keys[:, :, :7], torch.ones(1, 7, dtype=torch.long))  # more than it holds: the newest 5
    assert sorted(mem.keys.flatten().tolist()) == [22.0, 23.0, 24.0, 25.0, 26.0]


def test_a_memory_holds_what_was_written_and_its_empty_slots_belong_to_no_document() -> None:
    """3 of 5 slots written, with document id 1 (an id an empty slot must not carry): the memory
    holds 3 entries and its 2 empty slots belong to no document."""
    mem = Memory(5)
    assert mem.size() == 0
    keys = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    mem.add(keys, keys, torch.ones(1, 3, dtype=torch.long))
    assert mem.size() == 3 and int((mem.docs[0] == 1).sum()) == 3 and int((mem.docs[0] < 0).sum()) == 2


@needs_faiss
def test_each_search_builds_its_own_faiss_index() -> None:
    import faiss

    from anyformer.models.memory.knn import FaissIndex

    assert type(FaissIndex(KNNMemoryOptions(search="hnsw"), 8).index) is faiss.IndexHNSWFlat  # approximate: a graph
    assert type(FaissIndex(KNNMemoryOptions(search="flat"), 8).index) is faiss.IndexFlatIP  # exact: every entry


@needs_faiss
def test_faiss_flat_search_equals_torch_and_hnsw_recalls_the_exact_neighbours() -> None:
    torch.manual_seed(4)
    b, h, g, n, d, held = 2, 4, 2, 32, 16, 2000
    mem = Memory(held)
    mem.add(torch.randn(b, g, held, d), torch.randn(b, g, held, d), torch.zeros(b, held, dtype=torch.long))
    q, docs = torch.randn(b, h, n, d), torch.zeros(b, n, dtype=torch.long)
    exact, _ = search()(q, mem, docs, 8)
    flat, found = search("flat")(q, mem, docs, 8)
    assert bool(found.all()) and torch.equal(flat.sort(-1).values, exact.sort(-1).values)
    approx, found = search("hnsw", hnsw_ef_search=128)(q, mem, docs, 8)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx.flatten(0, 2), exact.flatten(0, 2))) / exact.numel()
    assert bool(found.all()) and recall > 0.9
    mem.docs[:, :1000] = -1  # cleared entries leave the indices, which are rebuilt
    again, found = search("flat")(q, mem, docs, 8)
    assert bool(found.all()) and int(again.min()) >= 1000


def test_equal_to_memorizing_transformers_knn_attention_on_the_same_weights(tmp_path) -> None:
    pytest.importorskip("faiss")
    mt = pytest.importorskip("memorizing_transformers_pytorch")
    from memorizing_transformers_pytorch.knn_memory import KNNMemory

    torch.manual_seed(5)
    b, s, dim, heads, e, top = 2, 8, 32, 4, 8, 4
    ref = mt.KNNAttention(dim=dim, heads=heads, dim_head=e, num_retrieved_memories=top).eval()
    store = KNNMemory(dim=e, max_memories=64, num_indices=b, memmap_filename=str(tmp_path / "knn.memmap"), multiprocessing=False)
    mem = Memory(64)
    x = torch.randn(b, 3 * s, dim)
    with torch.no_grad():
        for start in range(0, 3 * s, s):
            seg = x[:, start : start + s]
            expected, _ = ref(seg, knn_memory=store)
            # the same layer in anyformer's terms: cosine-normalised queries and one key/value head, scale exp(ref.scale)
            q = F.normalize(ref.to_q(seg).view(b, s, heads, e).transpose(1, 2), dim=-1)  # (b, h, s, e)
            k, v = ref.to_kv(seg).chunk(2, dim=-1)
            k, v = F.normalize(k, dim=-1)[:, None], v[:, None]  # (b, 1, s, e)
            scale = ref.scale.exp().flatten()
            assert torch.allclose(scale, scale[0])
            if mem.size() == 0:  # the first segment: local attention alone
                out = naive_attention_batch(q, k, v, float(scale[0]))
            else:
                out = retrieval_attention(q, k, v, mem, torch.zeros(b, s, dtype=torch.long), search(), top_k=top,
                                          gate=torch.zeros(heads), combine="joint", scale=float(scale[0]))
            got = ref.to_out(out.transpose(1, 2).reshape(b, s, heads * e))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            mem.add(k, v, torch.zeros(b, s, dtype=torch.long))


def naive_attention_batch(q, k, v, scale):  # type: ignore[no-untyped-def]
    n = q.shape[2]
    causal = torch.ones(n, n).tril().bool()
    rows = [naive_attention(q[r], k[r].expand(q.shape[1], -1, -1), v[r].expand(q.shape[1], -1, -1), causal, scale) for r in range(q.shape[0])]
    return torch.stack(rows).float()


def knn(model=None, **options):  # type: ignore[no-untyped-def]
    """A tiny decoder (model: its config overrides) retrieving in its first layer, with a gate
    that is not the initial even mix."""
    base = {"segment_len": 8, "memory_size": 32, "top_k": 4, "layer": 0}
    model = build(memory__kind="knn", memory__options={**base, **options}, **(model or {}))
    with torch.no_grad():
        model.retrieval.gate.normal_(0.0, 1.0)
    return model


def test_with_the_whole_history_in_memory_a_one_layer_model_is_the_plain_model_over_the_whole_text() -> None:
    """One layer, no positions: every segment's keys are the plain model's, so retrieving all of
    them with one joint softmax is full causal attention over the text."""
    tokens = torch.randint(0, 97, (2, 30))
    model = knn(memory_size=32, top_k=32, combine="joint", model={"num_layers": 1, "positional__kind": "none", "max_seq_len": 32})
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.inner(tokens), atol=1e-5, rtol=1e-5)


def test_no_memory_is_the_segmented_plain_model_and_the_first_segment_is_the_plain_models() -> None:
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        alone = knn(memory_size=0)
        segmented = torch.cat([alone.inner(tokens[:, s : s + 8]) for s in range(0, 30, 8)], 1)
        torch.testing.assert_close(alone(tokens), segmented)
        model = knn()
        out = model(tokens)
        plain = torch.cat([model.inner(tokens[:, s : s + 8]) for s in range(0, 30, 8)], 1)
    torch.testing.assert_close(out[:, :8], plain[:, :8], atol=1e-6, rtol=1e-6)
    assert float((out[:, 8:] - plain[:, 8:]).abs().max()) > 1e-3


def test_a_memory_of_one_segment_forgets_everything_older() -> None:
    tokens = torch.randint(0, 97, (2, 40))
    model = knn(memory_size=8)
    with torch.no_grad():
        out = model(tokens)
        later = model(tokens[:, 16:])  # segments 3 and 4 after segment 2 alone: what the memory still holds
    torch.testing.assert_close(out[:, 24:], later[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_a_boundary_token_starts_a_document_with_an_empty_memory(combine: str) -> None:
    tokens = torch.randint(1, 97, (2, 32))
    tokens[:, 8] = 0  # the second segment starts a new document
    model = knn(boundary_token=0, combine=combine)
    with torch.no_grad():
        out = model(tokens)
        alone = model(tokens[:, 8:])
        blind = knn(combine=combine)(tokens)
    torch.testing.assert_close(out[:, 8:], alone, atol=1e-5, rtol=1e-5)
    assert float((blind[:, 8:] - out[:, 8:]).abs().max()) > 1e-3  # without the boundary the first document is retrieved


@pytest.mark.parametrize("options", [{}, {"combine": "joint", "boundary_token": 3}, {"top_k": 2, "memory_size": 12}])
def test_cached_decoding_equals_the_full_forward(options) -> None:  # type: ignore[no-untyped-def]
    model = knn(**options)
    tokens = torch.randint(0, 97, (2, 37))
    tokens[:, 13] = 3
    assert_decoding_in_chunks_equals_forward(model, tokens, (3, 7, 1, 26))


@needs_faiss
def test_faiss_search_gives_the_torch_models_outputs_through_eviction_boundaries_and_decoding() -> None:
    """The faiss indices take each segment as it comes and drop stale entries: exact search
    must stay the torch search's; HNSW (a graph searched broadly) too on a small memory with
    nothing stale (with stale entries it searches 2k candidates and may keep fewer than k)."""
    tokens = torch.randint(1, 97, (2, 70))
    tokens[0, 21], tokens[1, 45] = 0, 0  # documents start mid-segment
    options = {"memory_size": 20, "top_k": 3, "boundary_token": 0}  # the ring wraps every few segments
    with torch.no_grad():
        exact = knn(**options)(tokens)
        torch.testing.assert_close(knn(search="flat", **options)(tokens), exact, atol=1e-5, rtol=1e-5)
        roomy = {"memory_size": 80, "top_k": 3}
        torch.testing.assert_close(knn(search="hnsw", hnsw_ef_search=64, **roomy)(tokens), knn(**roomy)(tokens), atol=1e-5, rtol=1e-5)
    assert_decoding_in_chunks_equals_forward(knn(search="flat", **options), tokens, (5, 30, 1, 1, 33))


def test_gradients_reach_the_gate_and_the_retrieving_queries() -> None:
    model = knn().train()
    tokens = torch.randint(0, 97, (2, 24))
    model(tokens[:, 8:16]).logsumexp(-1).mean().backward()  # one segment: no memory, the gate unused
    assert model.retrieval.gate.grad is None or float(model.retrieval.gate.grad.abs().sum()) == 0
    model.zero_grad()
    model(tokens).logsumexp(-1).mean().backward()
    layer = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert layer.kernel is model.retrieval
    assert float(model.retrieval.gate.grad.abs().sum()) > 0 and float(layer.q_proj.weight.grad.abs().sum()) > 0


def test_trains_from_a_config_and_resumes_exactly(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--model.memory.kind=knn", "--model.memory.options.segment_len=16",
                      "--model.memory.options.memory_size=32", "--model.memory.options.top_k=4", "--train.seq_len=64")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="top_k=64 asks for more neighbours than the memory holds \\(memory_size=32\\)"):
        build(memory__kind="knn", memory__options={"memory_size": 32, "top_k": 64, "segment_len": 8})
    with pytest.raises(ConfigError, match="layer=5 is not an attention layer of this model \\(2 of them"):
        build(memory__kind="knn", memory__options={"layer": 5, "segment_len": 8})
    with pytest.raises(ConfigError, match="segment_len=128 exceeds model.max_seq_len=64"):
        build(memory__kind="knn", memory__options={"segment_len": 128})
    with pytest.raises(ConfigError, match="wraps a decoder"):
        build("encoder", memory__kind="knn", memory__options={"segment_len": 8})
    with pytest.raises(ConfigError, match="kind 'mha'"):
        build(memory__kind="knn", memory__options={"segment_len": 8}, attention__kind="linear")
    with pytest.raises(ConfigError, match="positional kind 'shaw'"):
        build(memory__kind="knn", memory__options={"segment_len": 8}, positional__kind="shaw")
    model = build(memory__kind="knn", memory__options={"segment_len": 8, "memory_size": 16, "top_k": 4})
    with pytest.raises(ValueError, match="without padding"):
        model(torch.ones(2, 10, dtype=torch.long), attention_mask=torch.tensor([[True] * 10, [False] + [True] * 9]))


def test_reordering_the_cache_swaps_rows_memory_and_documents_as_beam_search_needs() -> None:
    """Decode 3 rows past two segments (memory filled, a boundary in one row), reorder the
    cache's rows to (2, 0, 0) as a beam step does and go on: every logit after the reorder
    equals the full forward of the rows in that order."""
    tokens = torch.randint(4, 97, (3, 30), generator=torch.Generator().manual_seed(0))
    tokens[0, 10] = 3
    assert_reordered_cache_continues(knn(boundary_token=3), tokens, torch.tensor([2, 0, 0]), (7, 19))


def test_a_segment_of_one_token_is_allowed_and_decodes() -> None:
    model = knn(segment_len=1, memory_size=6, top_k=2)
    assert_decoding_in_chunks_equals_forward(model, torch.randint(0, 97, (2, 9)), (1, 3, 5))
