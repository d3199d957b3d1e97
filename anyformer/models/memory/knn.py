"""kNN memory retrieval (Memorizing Transformers, Wu et al. 2022): a decoder read in segments,
one of whose attention layers also attends to the top-k (key, value) pairs retrieved from an
external memory of the earlier segments of the same document.

Legend: `b` batch, `n` queries, `m` local keys, `h` query heads, `g` key/value heads, `d` head
dim, `C` memory capacity (tokens per row), `k` neighbours retrieved per query, `s` segment length.

The input is read in segments of `segment_len` tokens, each through the wrapped decoder alone
(positions restart at 0 in every segment): the local attention is the segment's causal
attention. In the layer `layer`, each query also scores the keys held in memory, keeps its
`top_k` best (inner product: exact, by torch or faiss `IndexFlatIP`; or approximate, by faiss
HNSW) and attends to them beside its local keys, combined in one of two ways (`combine`):

    gate    (the paper)  out = g_h * softmax(q K_mem) V_mem + (1 - g_h) * softmax(q K_loc) V_loc,
                         g_h = sigmoid(b_h), one learned scalar per head
    joint                one softmax over the retrieved and the local logits together

The retrieved keys carry no position term (a positional bias, e.g. T5's or ALiBi's, acts on the
local logits only); with rotary positions a stored key keeps the rotation of its place in its
segment. After each full segment its keys and values in that layer (as the layer computed
them: normed and positioned) join the memory, detached (no gradient reaches the memory, as in
the paper); the current segment is never retrieved from (it is in the local attention). The
memory holds at most `memory_size` tokens per row and evicts the oldest first. With
`boundary_token` set, that token starts a new document in its row: no query retrieves an entry
of an earlier document, and those entries are cleared when the segment ends. A query with no
entry to retrieve (the first segment, a new document) takes its local attention alone, so the
first segment is the plain model's.

The memory lives for one forward pass (a training window or an evaluated text) or one
generation (in the decoding cache); nothing is carried from one training batch to the next.
Decoding keeps the wrapped decoder's cache for the current segment and the memory; when a
segment is full its keys join the memory and the cache is cleared: the cost per token is that
of a segment plus one search, however long the text.

Options (`model.memory.options`): segment_len (256), memory_size (4096), top_k (32), layer
(-1: the last; the paper puts it near the top), combine (gate | joint), search (torch | flat |
hnsw; the faiss ones need `pip install faiss-cpu`), hnsw_neighbors (32), hnsw_ef_search (64),
boundary_token (None).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ...config import ConfigError, ModelConfig, parse_options
from ...nn.attention.kernels import attention_logits, masked_softmax, repeat_kv
from ...nn.attention.mha import MultiHeadAttention
from ..registry import MEMORIES
from .segmented import SegmentCache, SegmentedDecoder


@dataclass
class KNNMemoryOptions:
    """segment_len: tokens per segment (the local attention's span); memory_size: tokens the
    memory holds per row (0: segments read alone); top_k: entries retrieved per query; layer:
    index of the retrieving attention layer (negative counts from the end); combine: 'gate'
    (learned per-head gate) or 'joint' (one softmax); search: 'torch' or 'flat' (exact), 'hnsw'
    (approximate); hnsw_neighbors, hnsw_ef_search: the HNSW graph's degree and search breadth;
    boundary_token: the token id that starts a new document (None: one document per row)."""

    segment_len: int = 256
    memory_size: int = 4096
    top_k: int = 32
    layer: int = -1
    combine: Literal["gate", "joint"] = "gate"
    search: Literal["torch", "flat", "hnsw"] = "torch"
    hnsw_neighbors: int = 32
    hnsw_ef_search: int = 64
    boundary_token: int | None = None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("model.memory.options.search='flat' or 'hnsw' searches with faiss, which is not installed: "
                          "pip install faiss-cpu (or use search='torch')") from None
    return faiss


_SERIALS = itertools.count()


class Memory:
    """The external memory of one layer: a ring of `capacity` slots per row holding keys and
    values (b, g, C, d), the document of each slot (b, C; -1: empty or cleared) and when each
    slot was written (C,; a count of tokens, the same in every row: oldest overwritten first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.docs: Tensor | None = None
        self.stamps: Tensor | None = None
        self.written = 0  # tokens written per row so far
        self.reorders = 0  # rows permuted (beam search): a search index must be rebuilt
        self.serial = next(_SERIALS)  # tells memories apart (an id() can be reused once one is freed)

    def size(self) -> int:
        """Entries held (in any row), at most the capacity."""
        return 0 if self.docs is None else int((self.docs >= 0).sum(-1).max())

    def add(self, keys: Tensor, values: Tensor, docs: Tensor) -> None:
        """Append a segment's keys and values (b, g, s, d) of documents docs (b, s), oldest
        evicted once full."""
        b, g, s, d = keys.shape
        if self.capacity == 0:
            return
        if self.keys is None:
            self.keys = keys.new_zeros(b, g, self.capacity, d)
            self.values = values.new_zeros(b, g, self.capacity, values.shape[-1])
            self.docs = torch.full((b, self.capacity), -1, dtype=torch.long, device=keys.device)
            self.stamps = torch.full((self.capacity,), -1, dtype=torch.long)
        if s > self.capacity:  # only the newest `capacity` of them can be kept
            keys, values, docs = keys[:, :, -self.capacity:], values[:, :, -self.capacity:], docs[:, -self.capacity:]
            self.written += s - self.capacity
            s = self.capacity
        slots = (self.written + torch.arange(s, device=keys.device)) % self.capacity
        self.keys[:, :, slots] = keys.detach().to(self.keys.dtype)
        self.values[:, :, slots] = values.detach().to(self.values.dtype)  # type: ignore[index]
        self.docs[:, slots] = docs  # type: ignore[index]
        self.stamps[slots.cpu()] = self.written + torch.arange(s)  # type: ignore[index]
        self.written += s

    def clear_before(self, docs: Tensor) -> None:
        """Clear every entry of a document earlier than docs (b,) in its row."""
        if self.docs is not None:
            stale = (self.docs >= 0) & (self.docs < docs[:, None])
            if bool(stale.any()):
                self.docs = self.docs.masked_fill(stale, -1)

    def reorder(self, index: Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)  # type: ignore[union-attr]
            self.docs = self.docs.index_select(0, index)  # type: ignore[union-attr]
            self.reorders += 1


class FaissIndex:
    """A faiss index over some entries of one row and key/value head of a memory, added in the
    order they were written: their slots and write stamps (an entry whose slot was since
    overwritten, or whose document was cleared, is stale and never returned)."""

    def __init__(self, o: KNNMemoryOptions, dim: int) -> None:
        faiss = _faiss()
        if o.search == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, o.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = max(o.hnsw_ef_search, 2 * o.top_k)
        else:
            self.index = faiss.IndexFlatIP(dim)
        self.slots = torch.zeros(0, dtype=torch.long)
        self.stamps = torch.zeros(0, dtype=torch.long)

    def add(self, keys: Tensor, slots: Tensor, stamps: Tensor) -> None:
        """keys (e, d) of the entries in `slots` written at `stamps` (e,)."""
        if len(slots):
            self.index.add(keys.detach().float().cpu().contiguous().numpy())
            self.slots, self.stamps = torch.cat([self.slots, slots.cpu()]), torch.cat([self.stamps, stamps.cpu()])

    def live(self, memory: Memory, row: int) -> Tensor:
        """Which entries (e,) still hold what was added."""
        return (memory.stamps[self.slots] == self.stamps) & (memory.docs[row].cpu()[self.slots] >= 0)  # type: ignore[index]


class Search:
    """Top-k inner-product search of queries (b, h, n, d) over a memory's keys: the slots
    (b, h, n, k) of the best entries of each query's own document, and whether each was found.

    The faiss indices (one per row and key/value head) take each segment's entries as they
    arrive; an exact (flat) index is rebuilt from the live entries once any is stale (a copy),
    an HNSW graph once stale entries outnumber half the live ones, and it is searched for 2k
    candidates, of which the k best live ones are kept."""

    def __init__(self, o: KNNMemoryOptions) -> None:
        self.options = o
        self._memory: tuple[int, int] | None = None  # (serial, reorders) of the memory the indices follow
        self._synced = 0  # memory.written when the indices last took new entries
        self._indices: list[list[FaissIndex]] = []

    def __call__(self, q: Tensor, memory: Memory, query_docs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self.options.search == "torch":
            return self._torch(q, memory, query_docs, k)
        return self._faiss(q, memory, query_docs, k)

    @staticmethod
    def _torch(q: Tensor, memory: Memory, query_docs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        used = min(memory.written, memory.capacity)  # slots fill in order before the ring wraps
        keys = repeat_kv(memory.keys[:, :, :used], q.shape[1] // memory.keys.shape[1])  # type: ignore[index]  # (b, h, C', d)
        scores = q.float() @ keys.float().transpose(-1, -2)  # (b, h, n, C')
        allowed = memory.docs[:, None, :used] == query_docs[:, :, None]  # type: ignore[index]  # (b, n, C')
        if not bool(allowed.all()):
            scores.masked_fill_(~allowed[:, None], float("-inf"))
        best, slots = scores.topk(min(k, used), dim=-1)  # (b, h, n, k)
        return slots, torch.isfinite(best)

    def _fresh(self, memory: Memory, row: int, head: int) -> FaissIndex:
        """An index over the live entries of a row and head, oldest first."""
        index = FaissIndex(self.options, memory.keys.shape[-1])  # type: ignore[union-attr]
        held = torch.nonzero((memory.stamps >= 0) & (memory.docs[row].cpu() >= 0)).flatten()  # type: ignore[operator, index]
        held = held[memory.stamps[held].argsort()]  # type: ignore[index]
        index.add(memory.keys[row, head, held.to(memory.keys.device)], held, memory.stamps[held])  # type: ignore[index]
        return index

    def _sync(self, memory: Memory) -> None:
        """Bring the indices up to date with the memory: new entries added, stale ones purged."""
        b, g = memory.keys.shape[:2]  # type: ignore[union-attr]
        if self._memory != (memory.serial, memory.reorders):
            self._indices = [[self._fresh(memory, r, j) for j in range(g)] for r in range(b)]
            self._memory, self._synced = (memory.serial, memory.reorders), memory.written
            return
        new = min(memory.written - self._synced, memory.capacity)
        stamps = torch.arange(memory.written - new, memory.written)
        slots = stamps % memory.capacity
        self._synced = memory.written
        for r, row in enumerate(self._indices):
            for j, index in enumerate(row):
                index.add(memory.keys[r, j, slots.to(memory.keys.device)], slots, stamps)  # type: ignore[index]
                alive = int(index.live(memory, r).sum())
                stale = index.index.ntotal - alive
                if stale and (self.options.search == "flat" or stale > alive // 2):
                    row[j] = self._fresh(memory, r, j)

    def _faiss(self, q: Tensor, memory: Memory, query_docs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        b, h, n, d = q.shape
        g = memory.keys.shape[1]  # type: ignore[union-attr]
        self._sync(memory)
        slots = torch.zeros(b, h, n, k, dtype=torch.long)
        found = torch.zeros(b, h, n, k, dtype=torch.bool)
        for r, row in enumerate(self._indices):
            for j, index in enumerate(row):
                total = index.index.ntotal
                if total == 0:
                    continue
                heads = slice(j * (h // g), (j + 1) * (h // g))
                queries = q[r, heads].detach().float().cpu().reshape(-1, d).contiguous().numpy()  # (h/g * n, d)
                live = index.live(memory, r)
                want = min(total, k if bool(live.all()) else 2 * k)
                _, ids = index.index.search(queries, want)
                ids = torch.from_numpy(ids).view(h // g, n, want)
                entry = ids.clamp(min=0)
                slot = index.slots[entry]
                ok = (ids >= 0) & live[entry] & (memory.docs[r].cpu()[slot] == query_docs[r].cpu()[None, :, None])
                keep = (~ok).long().argsort(dim=-1, stable=True)[..., :k]  # the best live candidates, in rank order
                take = keep.shape[-1]
                slots[r, heads, :, :take] = slot.gather(-1, keep)
                found[r, heads, :, :take] = ok.gather(-1, keep)
        return slots.to(q.device), found.to(q.device)


class RetrievalKernel(nn.Module):
    """The retrieving layer's attention kernel: the layer's own kernel while the memory is empty,
    else its causal local attention combined with the top-k memory entries. Installed in place
    of the chosen layer's kernel; `memory` and `query_docs` are set by `KNNMemory` while a
    segment runs, and `last_kv` keeps the keys/values of the last call (the segment so far)."""

    def __init__(self, inner: Callable[..., Tensor], heads: int, o: KNNMemoryOptions) -> None:
        super().__init__()
        self.inner, self.options = inner, o
        self.gate = nn.Parameter(torch.zeros(heads))  # b_h: sigmoid(0) = an even mix at the start
        self.search = Search(o)
        self.memory: Memory | None = None
        self.query_docs: Tensor | None = None
        self.last_kv: tuple[Tensor, Tensor] | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
                causal: bool = False, scale: float | None = None, dropout: float = 0.0) -> Tensor:
        self.last_kv = (k.detach(), v.detach())
        memory, docs = self.memory, self.query_docs
        if memory is None or docs is None or memory.size() == 0:
            return self.inner(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout=dropout)
        return retrieval_attention(q, k, v, memory, docs, self.search, top_k=self.options.top_k, gate=self.gate,
                                   combine=self.options.combine, mask=mask, bias=bias, causal=causal, scale=scale, dropout=dropout)


def _entries(table: Tensor, slots: Tensor) -> Tensor:
    """The entries (b, h, n, k, d) of a memory table (b, g, C, d) at slots (b, h, n, k) of each
    query head's key/value head."""
    b, g, c, d = table.shape
    h = slots.shape[1]
    base = (torch.arange(b, device=slots.device)[:, None] * g + torch.arange(h, device=slots.device)[None, :] // (h // g)) * c  # (b, h)
    rows = (slots + base[:, :, None, None]).flatten()
    return table.reshape(b * g * c, d).index_select(0, rows).view(*slots.shape, d)


def retrieval_attention(q: Tensor, k: Tensor, v: Tensor, memory: Memory, query_docs: Tensor, search: Callable[..., tuple[Tensor, Tensor]],
                        *, top_k: int, gate: Tensor, combine: str, mask: Tensor | None = None, bias: Tensor | None = None,
                        causal: bool = True, scale: float | None = None, dropout: float = 0.0) -> Tensor:
    """Queries q (b, h, n, d) over their local keys/values k, v (b, g, m, d) and the top_k
    entries of `memory` of their own documents (query_docs (b, n)) -> (b, h, n, d)."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    slots, found = search(q, memory, query_docs, min(top_k, memory.capacity))  # (b, h, n, k)
    kk = slots.shape[-1]
    mem_k, mem_v = _entries(memory.keys, slots), _entries(memory.values, slots)  # type: ignore[arg-type]  # (b, h, n, k, d)
    mem_logits = torch.einsum("bhnd,bhnkd->bhnk", q.float(), mem_k.float()) * scale
    mem_logits = mem_logits.masked_fill(~found, float("-inf"))  # (b, h, n, k)
    local = attention_logits(q, k, mask=mask, bias=bias, causal=causal, scale=scale)  # (b, h, n, m), -inf where masked
    v_local = repeat_kv(v, h // v.shape[1]).float()
    if combine == "joint":
        weights = nn.functional.dropout(masked_softmax(torch.cat([mem_logits, local], -1)), dropout)
        return (torch.einsum("bhnk,bhnke->bhne", weights[..., :kk], mem_v.float()) + weights[..., kk:] @ v_local).to(v.dtype)
    local_out = nn.functional.dropout(masked_softmax(local), dropout) @ v_local
    mem_out = torch.einsum("bhnk,bhnke->bhne", nn.functional.dropout(masked_softmax(mem_logits), dropout), mem_v.float())
    g = torch.sigmoid(gate.float())[None, :, None, None] * found.any(-1, keepdim=True)  # (b, h, n, 1): 0 without memory
    return (g * mem_out + (1 - g) * local_out).to(v.dtype)


class KNNMemoryCache(SegmentCache):
    """Decoding state: the wrapped decoder's cache of the current segment, the memory, each
    row's current document and how many tokens the segment holds."""

    def __init__(self, make_inner: Callable[[], nn.Module], capacity: int, batch: int, device: torch.device | str | None) -> None:
        super().__init__(make_inner)
        self.memory = Memory(capacity)
        self.docs = torch.zeros(batch, dtype=torch.long, device=device)
        self.segment_docs: list[Tensor] = []

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.memory.reorder(index)
        self.docs = self.docs.index_select(0, index)
        self.segment_docs = [d.index_select(0, index) for d in self.segment_docs]


class KNNMemory(SegmentedDecoder):
    """A decoder read in segments, one of its attention layers retrieving from a kNN memory."""

    what = "the kNN memory"

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        o = parse_options(KNNMemoryOptions, cfg.memory.options, "model.memory.options (knn)")
        layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        checks = [
            (bool(getattr(model, "causal", False)) and hasattr(model, "lm_head"),
             f"model.memory.kind=knn wraps a decoder (arch 'decoder'); got arch {cfg.arch!r}"),
            (o.segment_len >= 1, f"model.memory.options.segment_len must be >= 1, got {o.segment_len}"),
            (o.segment_len <= cfg.max_seq_len, f"model.memory.options.segment_len={o.segment_len} exceeds model.max_seq_len={cfg.max_seq_len}"),
            (o.memory_size >= 0, f"model.memory.options.memory_size must be >= 0 tokens, got {o.memory_size}"),
            (o.top_k >= 1, f"model.memory.options.top_k must be >= 1, got {o.top_k}"),
            (o.memory_size == 0 or o.top_k <= o.memory_size,
             f"model.memory.options.top_k={o.top_k} asks for more neighbours than the memory holds (memory_size={o.memory_size}); "
             "lower top_k or raise memory_size"),
            (o.hnsw_neighbors >= 2 and o.hnsw_ef_search >= 1,
             f"model.memory.options.hnsw_neighbors must be >= 2 and hnsw_ef_search >= 1, got {o.hnsw_neighbors} and {o.hnsw_ef_search}"),
            (bool(layers), f"model.memory.kind=knn retrieves in an attention layer of kind 'mha'; model.attention.kind is "
                           f"{cfg.attention.kind!r}"),
            (not layers or -len(layers) <= o.layer < len(layers),
             f"model.memory.options.layer={o.layer} is not an attention layer of this model ({len(layers)} of them: "
             f"0..{len(layers) - 1}, or negative from the end)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if o.search != "torch":
            _faiss()
        layer = layers[o.layer]
        if type(layer) is not MultiHeadAttention:
            raise ConfigError(f"model.memory.kind=knn retrieves in an attention layer of kind 'mha'; model.attention.kind is "
                              f"{cfg.attention.kind!r}")
        positional = getattr(model, "positional", None)
        if getattr(positional, "value_aware", False):
            raise ConfigError(f"model.memory.kind=knn does not take positional kind {cfg.positional.kind!r}: its term on the "
                              "attention output has no value for retrieved entries; use rope, alibi, t5, absolute or none")
        self.inner, self.config, self.options = model, cfg, o
        self.retrieval = RetrievalKernel(layer.kernel, layer.num_heads, o)
        layer.kernel = self.retrieval  # the chosen layer's kernel, now retrieving (its gate is a parameter of that layer)
        layer.lazy_bias = False  # positional biases reach it as one dense tensor per segment

    def _docs(self, tokens: Tensor, start: Tensor) -> Tensor:
        """The document of each token (b, n), rows starting in documents start (b,)."""
        if self.options.boundary_token is None:
            return start[:, None].expand_as(tokens)
        return start[:, None] + (tokens == self.options.boundary_token).long().cumsum(-1)

    def _run(self, memory: Memory, docs: Tensor, fn: Callable[[], Tensor]) -> Tensor:
        kernel = self.retrieval
        kernel.memory, kernel.query_docs = memory, docs
        try:
            return fn()
        finally:
            kernel.memory = kernel.query_docs = None

    def _store(self, memory: Memory, docs: Tensor) -> None:
        """The segment just read (its keys/values in the retrieving layer, of documents docs (b, s))
        joins the memory; entries of documents before each row's last are cleared."""
        k, v = self.retrieval.last_kv  # type: ignore[misc]
        memory.add(k, v, docs)
        memory.clear_before(docs[:, -1])

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """tokens (b, N) of any length -> logits (b, N, V)."""
        self.check_rows(tokens, attention_mask)
        s = self.options.segment_len
        memory = Memory(self.options.memory_size)
        row_docs = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        outs = []
        for start in range(0, tokens.shape[1], s):
            seg = tokens[:, start : start + s]
            docs = self._docs(seg, row_docs)
            outs.append(self._run(memory, docs, lambda: self.inner(seg)))
            if start + s < tokens.shape[1]:
                self._store(memory, docs)
            row_docs = docs[:, -1]
        return torch.cat(outs, 1)

    # --- the model protocol (anyformer.protocol) ---

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, window: int | None = None, **kwargs: Any) -> KNNMemoryCache:
        self.check_decoding(window=window)
        s = self.options.segment_len
        return KNNMemoryCache(lambda: self.inner.make_cache(batch, s, dtype=dtype, device=device),  # type: ignore[operator]
                              self.options.memory_size, batch, device)

    def decode_step(self, tokens: Tensor, cache: KNNMemoryCache, positions: Tensor, *, attention_mask: Tensor | None = None,
                    source: Any = None, last_only: bool = False) -> Tensor:
        """(b, n) tokens -> logits (b, n, V); a full segment joins the memory."""
        self.check_decoding(attention_mask)
        s = self.options.segment_len
        outs, i, n = [], 0, tokens.shape[1]
        while i < n:
            take = min(n - i, s - cache.filled)
            chunk = tokens[:, i : i + take]
            docs = self._docs(chunk, cache.docs.to(chunk.device))
            step = lambda: self.inner.decode_step(chunk, cache.inner, cache.inner.next_positions(  # noqa: E731
                torch.ones_like(chunk, dtype=torch.bool)))  # type: ignore[operator]
            outs.append(self._run(cache.memory, docs, step))
            cache.segment_docs.append(docs)
            cache.docs = docs[:, -1]
            cache.filled += take
            cache.length += take
            i += take
            if cache.filled == s:
                self._store(cache.memory, torch.cat(cache.segment_docs, 1))
                cache.inner, cache.filled, cache.segment_docs = cache.make_inner(), 0, []
        return outs[-1][:, -1:] if last_only else torch.cat(outs, 1)


@MEMORIES.register("knn")
def build_knn_memory(model: nn.Module, cfg: ModelConfig) -> KNNMemory:
    """Memorizing Transformers: one attention layer retrieving top-k entries of earlier segments."""
    return KNNMemory(model, cfg)
