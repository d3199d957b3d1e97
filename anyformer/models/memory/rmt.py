"""Recurrent Memory Transformer (Bulatov et al. 2022; decoders: Bulatov et al. 2023): an input
of any length read in segments, with memory tokens carrying state from one segment to the next.

Legend: `b` batch, `N` input length, `s` segment length, `m` memory tokens, `d` width, `V`
vocabulary.

Segment k is read as [memory_k] + its s tokens + [memory_k]: the same m memory vectors at both
ends. The first m positions are the read memory (every token of the segment attends to them);
the last m are the write memory, which attends to the whole segment, and whose final hidden
states are memory_{k+1}. memory_0 is a learned (m, d) parameter. The wrapped model's math is
unchanged: the memory vectors take the place of the token embeddings at those positions (a
hook on the model's embedding module; they get no embedding norm, dropout or absolute position
added), and positions run 0 .. 2m + s - 1 in every segment, so 2m + s must fit
`model.max_seq_len`.

An input whose length is not a multiple of s is padded at the end (the padding is masked out of
attention, its outputs dropped; nothing is truncated). With m = 0 each segment is read alone:
the segmented plain model, the baseline RMT improves on.

Backpropagation through time (`bptt_depth` = k): the memories that segments pass on are
detached except the last k, so the loss of the last segment reaches the tokens of the last
k + 1 segments and none before (the rule of the authors' code); the initial memory always
learns from the first segment. None: through every segment.

Decoding (anyformer.protocol): the cache holds the wrapped decoder's cache for the current
segment and the memory. When a segment is full, its write memory runs through that cache and
becomes the next memory; the cache is then cleared and the next segment starts with the read
memory, so the cost per generated token stays that of a segment, however long the text.

Options (`model.memory.options`): num_memory (m, 10), segment_len (s, 128), bptt_depth (None).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError, ModelConfig, parse_options
from ...protocol import DecodingInfo
from ..registry import MEMORIES
from .segmented import ANY_LENGTH, SegmentCache



@dataclass
class RMTOptions:
    """num_memory: memory tokens m (0: segments read alone); segment_len: text tokens per segment
    s; bptt_depth: memory transitions that carry gradients (None: all)."""

    num_memory: int = 10
    segment_len: int = 128
    bptt_depth: int | None = None


class RMTCache(SegmentCache):
    """Decoding state: the wrapped decoder's cache of the current segment, the memory (b, m, d)
    and how many tokens the segment holds; `length` counts every token seen."""

    def __init__(self, make_inner: Callable[[], nn.Module], memory: Tensor) -> None:
        super().__init__(make_inner)
        self.memory = memory
        self.started = False  # the read memory of the current segment is in the inner cache

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.memory = self.memory.index_select(0, index)


class RecurrentMemory(nn.Module):
    """A decoder or encoder read in segments with memory tokens (module docstring)."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        o = parse_options(RMTOptions, cfg.memory.options, "model.memory.options (rmt)")
        if o.num_memory < 0:
            raise ConfigError(f"model.memory.options.num_memory must be >= 0 (0 = segments read alone), got {o.num_memory}")
        if o.segment_len < 1:
            raise ConfigError(f"model.memory.options.segment_len must be >= 1, got {o.segment_len}")
        if o.bptt_depth is not None and o.bptt_depth < 0:
            raise ConfigError(f"model.memory.options.bptt_depth must be >= 0 or null (all segments), got {o.bptt_depth}")
        if 2 * o.num_memory + o.segment_len > cfg.max_seq_len:
            raise ConfigError(
                f"a segment is read with its memory at both ends: 2 x num_memory ({o.num_memory}) + segment_len "
                f"({o.segment_len}) = {2 * o.num_memory + o.segment_len} positions, more than model.max_seq_len={cfg.max_seq_len}; "
                "lower model.memory.options.segment_len or num_memory, or raise model.max_seq_len"
            )
        if not hasattr(model, "embed") or not callable(getattr(model, "hidden", None)):
            raise ConfigError(f"model.memory.kind=rmt wraps a decoder or encoder (arch 'decoder' or 'encoder'); got arch {cfg.arch!r}")
        self.inner, self.config, self.options = model, cfg, o
        self.memory = nn.Parameter(torch.zeros(o.num_memory, cfg.dim))
        self.causal = bool(getattr(model, "causal", False))
        self._inject: tuple[Tensor, Tensor] | None = None  # (positions (p,), vectors (b, p, d)) for the embedding hook
        model.embed.register_forward_hook(self._embedding_hook)

    def reset_extra_parameters(self) -> None:
        nn.init.normal_(self.memory, std=self.config.init_std)

    def _embedding_hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if self._inject is None:
            return None
        where, vectors = self._inject
        out = output.clone()
        out[:, where] = vectors.to(out.dtype)
        return out

    @contextmanager
    def _memory_at(self, where: Tensor, vectors: Tensor) -> Iterator[None]:
        self._inject = (where, vectors)
        try:
            yield
        finally:
            self._inject = None

    def _head(self, hidden: Tensor, keep: Tensor | None) -> Tensor:
        if self.causal:
            return self.inner.lm_head(hidden)  # type: ignore[operator]
        return self.inner.head(hidden, keep)  # type: ignore[operator]

    def _segment(self, seg: Tensor, keep: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """One segment (b, s) with its padding mask and the incoming memory (b, m, d) -> (the
        head's outputs for its tokens, the outgoing memory (b, m, d))."""
        b, s = seg.shape
        m = memory.shape[1]
        if m == 0:
            hidden = self.inner.hidden(seg, attention_mask=None if bool(keep.all()) else keep)  # type: ignore[operator]
            return self._head(hidden, keep), memory
        ids = torch.cat([seg.new_zeros(b, m), seg, seg.new_zeros(b, m)], 1)
        full_keep = torch.cat([keep.new_ones(b, m), keep, keep.new_ones(b, m)], 1)
        where = torch.cat([torch.arange(m), torch.arange(m + s, 2 * m + s)]).to(seg.device)
        with self._memory_at(where, torch.cat([memory, memory], 1)):
            hidden = self.inner.hidden(ids, attention_mask=None if bool(full_keep.all()) else full_keep)  # type: ignore[operator]
        return self._head(hidden[:, m : m + s], keep), hidden[:, m + s :]

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """tokens (b, N) of any length -> the wrapped model's per-token outputs (b, N, ...)
        (logits (b, N, V) for a decoder); a pooled encoder head gives the last segment's output."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        b, n = tokens.shape
        s = self.options.segment_len
        segments = max(1, -(-n // s))
        keep = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pad = segments * s - n
        if pad:
            tokens, keep = F.pad(tokens, (0, pad)), F.pad(keep, (0, pad), value=False)
        memory = self.memory[None].expand(b, -1, -1)
        depth = self.options.bptt_depth
        outs = []
        for k in range(segments):
            if k > 0 and depth is not None and k < segments - depth:
                memory = memory.detach()
            out, memory = self._segment(tokens[:, k * s : (k + 1) * s], keep[:, k * s : (k + 1) * s], memory)
            outs.append(out)
        if outs[0].dim() == 2:  # a pooled head: the last segment has read everything
            return outs[-1]
        return torch.cat(outs, 1)[:, :n]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per text token (model summary) for an input of `seq_len` tokens: each
        of its ceil(seq_len / s) segments runs the wrapped model's blocks over s + 2m positions
        (the memory at both ends; a short last segment is padded to s), with attention over that
        segment however long the input, and the head over each segment's s text positions
        (padding of a short last segment included)."""
        from ..builders import count_parameters
        from ..summary import _embedding_params, flops_per_token

        s, m = self.options.segment_len, self.options.num_memory
        positions = s + 2 * m
        segments = max(1, -(-seq_len // s))
        weights = count_parameters(self.inner) - _embedding_params(self.inner)
        head = flops_per_token(self.config, 0, 0)  # the head alone: no weights and no context
        per_position = flops_per_token(self.config, weights, positions) - head
        return (segments * positions * per_position + segments * s * head) / max(1, seq_len)

    # --- the model protocol (anyformer.protocol), decoders only ---

    def _decoder_only(self) -> None:
        if not self.causal:
            raise ValueError("generation needs a decoder; this memory model wraps an encoder")

    def decoding_info(self) -> DecodingInfo:
        self._decoder_only()
        info = self.inner.decoding_info()  # type: ignore[operator]
        return DecodingInfo(encoder_decoder=False, max_seq_len=ANY_LENGTH, absolute_positions=info.absolute_positions,
                            positional=info.positional)

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        raise ValueError("a memory-token decoder has no encoder; its prompts are decoder tokens")

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, window: int | None = None, **kwargs: Any) -> RMTCache:
        """A cache of one segment plus the memory, whatever `max_len` (any length decodes)."""
        self._decoder_only()
        if window is not None:
            raise ValueError("a memory-token model carries its memory across segments instead of a rolling cache; drop `window`")
        m, s = self.options.num_memory, self.options.segment_len
        p = self.memory
        memory = p[None].expand(batch, -1, -1).to(dtype or p.dtype)
        return RMTCache(lambda: self.inner.make_cache(batch, 2 * m + s, dtype=dtype, device=device), memory)  # type: ignore[operator]

    def _run_memory(self, cache: RMTCache) -> Tensor:
        """The memory through the inner cache (read at a segment's start, write at its end)."""
        b, m = cache.memory.shape[:2]
        ids = torch.zeros(b, m, dtype=torch.long, device=cache.memory.device)
        with self._memory_at(torch.arange(m, device=ids.device), cache.memory):
            return self.inner.hidden(ids, cache.inner)  # type: ignore[operator]

    def decode_step(self, tokens: Tensor, cache: RMTCache, positions: Tensor, *, attention_mask: Tensor | None = None,
                    source: Any = None, last_only: bool = False) -> Tensor:
        """(b, n) tokens through the cache -> logits (b, n, V), closing segments as they fill."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a memory-token decoder generates rows of equal length only (no padding); give prompts one at a time")
        m, s = self.options.num_memory, self.options.segment_len
        outs, i, n = [], 0, tokens.shape[1]
        while i < n:
            if not cache.started:
                if m:
                    self._run_memory(cache)
                cache.started = True
            take = min(n - i, s - cache.filled)
            outs.append(self.inner.lm_head(self.inner.hidden(tokens[:, i : i + take], cache.inner)))  # type: ignore[operator]
            cache.filled += take
            cache.length += take
            i += take
            if cache.filled == s:  # the segment is full: write the memory, start afresh
                if m:
                    cache.memory = self._run_memory(cache)
                cache.inner, cache.filled, cache.started = cache.make_inner(), 0, False
        return outs[-1][:, -1:] if last_only else torch.cat(outs, 1)


@MEMORIES.register("rmt")
def build_rmt(model: nn.Module, cfg: ModelConfig) -> RecurrentMemory:
    """Memory tokens read and written per segment (Recurrent Memory Transformer)."""
    return RecurrentMemory(model, cfg)
