"""MEGABYTE (Yu et al. 2023): a byte-level decoder in two levels, a global model over patches of
bytes and a local model over the bytes of each patch.

Legend: `b` batch, `T` bytes, `P` patch size, `K` patches (T / P), `D` global width, `e` local
width, `V` vocabulary (256 bytes, or a tokenizer's ids).

    global input of patch k:  a learned start vector (k = 0), else Linear(P e -> D) of the
                              concatenated global byte embeddings of patch k - 1
    h = global causal stack over the K patch positions                        (b, K, D)
    local input of byte t of patch k:  Linear(D -> P e)(h_k)[t] + local embedding of byte
                              t - 1 of the patch (a learned start vector at t = 0)
    logits = LM head of the local causal stack over the P bytes of each patch  (b, T, V)

Byte t of patch k is predicted from the patches before k (through h_k) and the bytes before t
in its own patch: causal at byte level. Both levels are ordinary stacks built from the config's
parts (attention, positions, norms, feed-forwards as configured), so the model's math is the
library's. `forward(tokens)` follows the decoders' convention: logits[:, i] predicts
tokens[:, i + 1] (an input whose length is not a multiple of P is padded at the end; the
padding cannot reach earlier predictions).

Decoding keeps a cache at each level: the global stack's over patches, and the local stack's
over the bytes of the current patch (cleared when a patch completes, after which the global
model reads the finished patch). Past `max_seq_len`, generation recomputes the last
max_seq_len bytes per step (decoding_info reports absolute positions: no rolling cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..nn.kv_cache import CacheSpec
from ..protocol import DecodingInfo
from .common import LMHead, check_tokens, random_tokens, self_attention_context
from .parts import Parts
from .registry import ARCHITECTURES, moved_section


@dataclass
class MegabyteOptions:
    """`model.options` of arch `megabyte`: bytes grouped into patches of `patch_size`; the
    global model is the config's stack (dim, num_layers) over patches, the local model a stack
    of `local_layers` blocks of width `local_dim` (None: dim) with `local_heads` heads (None:
    attention.num_heads) over the bytes of one patch."""

    patch_size: int = 4
    local_dim: int | None = None
    local_layers: int = 2
    local_heads: int | None = None

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when the patches or the local stack do not fit the config."""
        level_configs(cfg)


moved_section("megabyte", "megabyte")


def level_configs(cfg: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The global and local stacks' configs, after checking that the patch size fits."""
    mb: MegabyteOptions = cfg.arch_options
    p = mb.patch_size
    if p < 1 or p > cfg.max_seq_len or cfg.max_seq_len % p:
        raise ConfigError(
            f"model.options.patch_size={p} must divide model.max_seq_len={cfg.max_seq_len} "
            f"(a context of whole patches); choose a divisor such as {next(d for d in (8, 4, 2, 1) if cfg.max_seq_len % d == 0)}"
        )
    local_dim = mb.local_dim or cfg.dim
    heads = mb.local_heads or cfg.attention.num_heads
    if local_dim % heads or mb.local_layers < 1:
        raise ConfigError(f"model.options: local_dim={local_dim} must be a multiple of local_heads={heads}, and local_layers >= 1 "
                          f"(got {mb.local_layers})")
    # the two levels are plain decoder stacks: their configs carry none of the megabyte options
    glob = dataclasses.replace(cfg, arch="decoder", options={}, max_seq_len=cfg.max_seq_len // p + 1)  # + 1: the patch after a full context
    local = dataclasses.replace(
        cfg, arch="decoder", options={}, dim=local_dim, num_layers=mb.local_layers, max_seq_len=p,
        attention=dataclasses.replace(cfg.attention, num_heads=heads, num_kv_heads=None, head_dim=None),
        ffn=dataclasses.replace(cfg.ffn, hidden_dim=None),
    )
    return glob, local


class MegabyteCache(nn.Module):
    """The global cache over patches, the local cache of the current patch, that patch's local
    conditioning (b, P, e) and bytes (b, P), and counts."""

    def __init__(self, global_cache: nn.Module, make_local: Any, batch: int, patch: int, device: Any) -> None:
        super().__init__()
        self.global_cache, self.make_local = global_cache, make_local
        self.local_cache = make_local()
        self.cond: Tensor | None = None
        self.patch_bytes = torch.zeros(batch, patch, dtype=torch.long, device=device)
        self.t = 0  # bytes of the current patch so far
        self.length = 0

    def next_positions(self, keep: Tensor) -> Tensor:
        return self.length + keep.long().cumsum(-1) - 1

    def reorder(self, index: Tensor) -> None:
        self.global_cache.reorder(index)
        self.local_cache.reorder(index)
        self.cond = None if self.cond is None else self.cond.index_select(0, index)
        self.patch_bytes = self.patch_bytes.index_select(0, index)


class Megabyte(nn.Module):
    """Global model over patches, local model over bytes (module docstring)."""

    causal = True

    def __init__(self, cfg: ModelConfig, glob: Parts, local: Parts) -> None:
        super().__init__()
        self.config = cfg
        self.patch = p = cfg.arch_options.patch_size
        d, e, v = glob.cfg.dim, local.cfg.dim, cfg.vocab_size
        self.global_bytes = nn.Embedding(v, e)
        self.patch_in = nn.Linear(p * e, d)
        self.global_start = nn.Parameter(torch.zeros(d))
        self.global_positional = glob.positional(causal=True)
        self.global_stack = glob.stack(glob.cfg.num_layers, causal=True, name="global")
        self.to_local = nn.Linear(d, p * e)
        self.local_bytes = nn.Embedding(v, e)
        self.local_start = nn.Parameter(torch.zeros(e))
        self.local_positional = local.positional(causal=True)
        self.local_stack = local.stack(local.cfg.num_layers, causal=True, name="local")
        self.lm_head = LMHead(e, v, tied=self.local_bytes if cfg.tie_embeddings else None, scale=cfg.logit_scale)
        self.global_heads, self.local_heads = glob.cfg.attention.num_heads, local.cfg.attention.num_heads
        self.attention_widths = (self.global_heads * glob.cfg.head_dim, self.local_heads * local.cfg.head_dim)

    def reset_extra_parameters(self) -> None:
        nn.init.normal_(self.global_start, std=self.config.init_std)
        nn.init.normal_(self.local_start, std=self.config.init_std)

    def _global(self, x: Tensor, cache: Any = None) -> Tensor:
        """Global inputs (b, k, D) -> hidden states (b, k, D), through `cache` when given."""
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        ctx = self_attention_context(ids, self.global_positional, causal=True, num_heads=self.global_heads, cache=cache)
        x = self.global_positional.embed_graph(x, ctx.q_pos, None)
        return self.global_stack(x, ctx, None if cache is None else list(cache.layers))

    def _local(self, x: Tensor, cache: Any = None) -> Tensor:
        """Local inputs (B, t, e) -> logits (B, t, V), through `cache` when given."""
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        ctx = self_attention_context(ids, self.local_positional, causal=True, num_heads=self.local_heads, cache=cache)
        x = self.local_positional.embed_graph(x, ctx.q_pos, None)
        return self.lm_head(self.local_stack(x, ctx, None if cache is None else list(cache.layers)))

    def predict_bytes(self, x: Tensor) -> Tensor:
        """Bytes x (b, T), T a multiple of P -> logits (b, T, V) of each byte from those before it."""
        b, t = x.shape
        p, k = self.patch, t // self.patch
        e = self.local_bytes.embedding_dim
        patches = self.patch_in(self.global_bytes(x).reshape(b, k, p * e))  # (b, K, D)
        start = self.global_start.to(patches.dtype).expand(b, 1, -1)
        h = self._global(torch.cat([start, patches[:, :-1]], 1))  # (b, K, D)
        prev = self.local_bytes(x).reshape(b * k, p, e)
        first = self.local_start.to(prev.dtype).expand(b * k, 1, e)
        local_in = self.to_local(h).reshape(b * k, p, e) + torch.cat([first, prev[:, :-1]], 1)
        return self._local(local_in).reshape(b, t, -1)

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random bytes, `length` of them (default: the context)."""
        return (random_tokens(self, batch, generator, length),)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """tokens (b, n) -> logits (b, n, V); logits[:, i] predicts tokens[:, i + 1]."""
        check_tokens(tokens, self.config.vocab_size)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MEGABYTE reads rows without padding (causal bytes); give sequences of equal length")
        b, n = tokens.shape
        pad = -(n + 1) % self.patch
        x = F.pad(tokens, (0, 1 + pad))  # one byte more: the prediction after the last token
        return self.predict_bytes(x)[:, 1 : n + 1]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per byte of a forward over `seq_len` bytes (for the model summary): the
        global stack and the projections into and out of it once per patch, the local stack and
        the head once per byte, each stack's attention over its causal context (half of it on
        average). The forward reads one byte more than it is given (the prediction after the
        last), rounded up to whole patches; that work is counted and shared among the bytes."""
        p = self.patch
        count = lambda *mods: sum(x.numel() for m in mods for x in m.parameters())  # noqa: E731
        glob, local = self.global_stack, self.local_stack
        g_width, l_width = self.attention_widths
        e = self.local_bytes.embedding_dim
        g_layers, l_layers = len(glob.blocks), len(local.blocks)
        processed = seq_len + 1 + (-(seq_len + 1) % p)
        patches = processed // p
        per_patch = 2 * count(glob, self.patch_in, self.to_local) + 2 * 2 * g_layers * (patches / 2) * g_width
        per_byte = 2 * count(local) + 2 * 2 * l_layers * (p / 2) * l_width + 2 * e * self.config.vocab_size
        return (patches * per_patch + processed * per_byte) / seq_len

    def decoding_flops_per_token(self, seq_len: int) -> float:
        """FLOPs of one decoding step per byte, averaged over a patch, with `seq_len - 1` bytes
        cached (model summary): the local stack and the head every byte, attending to the bytes
        of its patch so far; the global stack and the projections into and out of it once per
        patch, attending to every cached patch."""
        p = self.patch
        count = lambda *mods: sum(x.numel() for m in mods for x in m.parameters())  # noqa: E731
        g_width, l_width = self.attention_widths
        e = self.local_bytes.embedding_dim
        g_layers, l_layers = len(self.global_stack.blocks), len(self.local_stack.blocks)
        per_patch = 2 * count(self.global_stack, self.patch_in, self.to_local) + 2 * 2 * g_layers * (seq_len / p) * g_width
        per_byte = 2 * count(self.local_stack) + 2 * 2 * l_layers * ((p + 1) / 2) * l_width + 2 * e * self.config.vocab_size
        return per_patch / p + per_byte

    # --- the model protocol (anyformer.protocol) ---

    def decoding_info(self) -> DecodingInfo:
        return DecodingInfo(encoder_decoder=False, max_seq_len=self.config.max_seq_len, absolute_positions=True,
                            positional=self.config.positional.kind)

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        raise ValueError("MEGABYTE is a decoder; its prompts are bytes")

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, window: int | None = None, **kwargs: Any) -> MegabyteCache:
        """Caches at both levels for `batch` rows of up to `max_len` (default max_seq_len) bytes."""
        if window is not None:
            raise ValueError("MEGABYTE keeps a cache per level and no rolling cache; drop `window`")
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        patches = -(-(max_len or self.config.max_seq_len) // self.patch) + 1
        spec = CacheSpec(batch, patches, dtype, device)
        global_cache = spec.model_cache(self.global_stack.make_caches(spec))
        local_spec = CacheSpec(batch, self.patch, dtype, device)
        return MegabyteCache(global_cache, lambda: local_spec.model_cache(self.local_stack.make_caches(local_spec)), batch,
                             self.patch, device)

    def _start_patch(self, cache: MegabyteCache, global_in: Tensor) -> Tensor:
        """One global step (b, 1, D) -> the new patch's conditioning; logits (b, 1, V) of its first byte."""
        h = self._global(global_in, cache.global_cache)
        cache.cond = self.to_local(h).reshape(h.shape[0], self.patch, -1)
        cache.local_cache, cache.t = cache.make_local(), 0
        first = self.local_start.to(cache.cond.dtype).expand(h.shape[0], 1, -1)
        return self._local(cache.cond[:, :1] + first, cache.local_cache)

    def decode_step(self, tokens: Tensor, cache: MegabyteCache, positions: Tensor, *, attention_mask: Tensor | None = None,
                    source: Any = None, last_only: bool = False) -> Tensor:
        """(b, n) bytes through both caches -> logits (b, n, V), each predicting the next byte."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MEGABYTE generates rows of equal length only (no padding); give prompts one at a time")
        check_tokens(tokens, self.config.vocab_size)
        b = tokens.shape[0]
        if cache.cond is None:  # the first patch starts from the learned start vector
            self._start_patch(cache, self.global_start.expand(b, 1, -1).to(self.patch_in.weight.dtype))
        outs = []
        for j in range(tokens.shape[1]):
            byte = tokens[:, j : j + 1]
            cache.patch_bytes[:, cache.t] = byte[:, 0]
            cache.t += 1
            cache.length += 1
            if cache.t < self.patch:
                assert cache.cond is not None
                outs.append(self._local(cache.cond[:, cache.t : cache.t + 1] + self.local_bytes(byte), cache.local_cache))
            else:  # the patch is complete: the global model reads it
                e = self.local_bytes.embedding_dim
                outs.append(self._start_patch(cache, self.patch_in(self.global_bytes(cache.patch_bytes).reshape(b, 1, self.patch * e))))
        return outs[-1][:, -1:] if last_only else torch.cat(outs, 1)


@ARCHITECTURES.register("megabyte", options=MegabyteOptions)
def build_megabyte(cfg: ModelConfig, parts: Parts) -> Megabyte:
    """MEGABYTE: a global stack over patches of bytes and a local stack within each patch."""
    glob, local = level_configs(cfg)
    return Megabyte(cfg, Parts(glob), Parts(local))
