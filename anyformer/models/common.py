"""Pieces every model shares: token embeddings, the block stack, the LM head, input checks.

Legend: `b` batch, `n` length, `m` key length, `d` width, `V` vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.attention import AttentionContext, as_4d, combine_masks, padding_mask
from ..nn.attention.masks import split_user_mask
from ..nn.kv_cache import CacheSpec, CrossKVCache, ModelCache
from ..nn.positional import PositionalEncoding, uses_absolute_positions
from ..protocol import DecodingInfo
from ..registry import Registry


def check_tokens(tokens: Tensor, vocab_size: int, name: str = "tokens") -> None:
    """Raise a clear error for token ids that are not integers in [0, vocab_size)."""
    if tokens.dim() != 2:
        hint = f"; for one sequence add a batch dimension ({name}[None])" if tokens.dim() == 1 else ""
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(tokens.shape)}{hint}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty: give at least one token per sequence")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{name} contains id {bad}, outside the vocabulary [0, {vocab_size}); check the "
            "tokenizer matches the model, or build the model with a larger vocab_size"
        )


def random_tokens(model: nn.Module, batch: int, generator: torch.Generator, length: int | None = None) -> Tensor:
    """(batch, length) token ids drawn uniformly from the model's vocabulary (length: its
    context by default), on the model's device: an input of `example_inputs`."""
    cfg = model.config  # type: ignore[union-attr]
    tokens = torch.randint(0, cfg.vocab_size, (batch, length or cfg.max_seq_len), generator=generator)
    return tokens.to(next(model.parameters()).device)


EXPORTERS: Registry = Registry("exporter")


class PretrainedIO:
    """`model.save_pretrained(dir)`: the Hugging Face layout (config.json + model.safetensors)
    that `transformers` and `anyformer.from_pretrained` load; the exporter registers itself
    under 'hf' (anyformer.convert.pretrained)."""

    def save_pretrained(self, path: "str | Path", tokenizer: Any = None) -> "Path":
        return EXPORTERS.get("hf")(self, path, tokenizer)


class GenerativeModel:
    """The model protocol of anyformer.protocol for models whose decoding runs one causal
    stack; subclasses name that stack and its positional encoding in `_decoding_parts`."""

    cross_attention = False  # the decoding stack's blocks attend to an encoded source

    def _decoding_parts(self) -> tuple[nn.Module, PositionalEncoding]:
        return self.stack, self.positional  # type: ignore[attr-defined]

    def decoding_info(self) -> DecodingInfo:
        """Protocol: what decoding needs to know about this model."""
        _, positional = self._decoding_parts()
        cfg = self.config  # type: ignore[attr-defined]
        return DecodingInfo(
            encoder_decoder=self.cross_attention, max_seq_len=cfg.max_seq_len,
            absolute_positions=uses_absolute_positions(positional), positional=cfg.positional.kind,
            decoder_start_token_id=getattr(self, "decoder_start_token_id", None),
            long_context=getattr(self, "long_context", None),
        )

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        """Protocol: the encoded source of an encoder-decoder; decoder-only models have none."""
        raise ValueError(f"{type(self).__name__} has no encoder; its prompts are decoder tokens")

    def make_cache(
        self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        window: int | None = None, sinks: int = 4, true_positions: bool = False,
    ) -> ModelCache:
        """Protocol: a decoding cache for `batch` sequences of up to `max_len` (default
        max_seq_len) tokens; with `window`, a rolling cache of `sinks` first tokens plus the
        `window` most recent ones (relative positional encodings only), or with
        `true_positions` a Λ cache in which they keep their own positions (LM-Infinite)."""
        stack, positional = self._decoding_parts()
        cfg = self.config  # type: ignore[attr-defined]
        if window is not None and uses_absolute_positions(positional):
            raise ValueError(
                f"a rolling cache re-assigns positions, which needs a relative positional encoding "
                f"(rope, alibi, t5, none); this model uses '{cfg.positional.kind}'. Drop `window`"
            )
        p = next(self.parameters())  # type: ignore[attr-defined]
        spec = CacheSpec(batch, max_len or cfg.max_seq_len, dtype or p.dtype, device or p.device, window=window, sinks=sinks,
                         true_positions=true_positions)
        layers = stack.make_caches(spec)  # type: ignore[operator]
        cross = [CrossKVCache() for _ in layers] if self.cross_attention else None
        return spec.model_cache(layers, cross)


class Embeddings(nn.Module):
    """Token (plus optional token-type) embeddings, input-side positions, norm and dropout.

    Args:
        vocab_size, dim: table size.
        scale: multiplies token embeddings (sqrt(d) in the original Transformer).
        num_token_types: BERT segment embeddings when > 0.
        norm: applied after the sum (BERT), or None.
        dropout: on the output.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        scale: float,
        num_token_types: int,
        norm: nn.Module | None,
        dropout: float,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tokens = nn.Embedding(vocab_size, dim)
        self.token_types = nn.Embedding(num_token_types, dim) if num_token_types else None
        self.scale = scale
        self.norm = norm or nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tokens: Tensor, positions: Tensor, positional: PositionalEncoding, token_types: Tensor | None = None,
        *, graph: Tensor | None = None,
    ) -> Tensor:  # (b, n) -> (b, n, d); graph: the user's attention mask, for graph positional encodings
        check_tokens(tokens, self.vocab_size)
        x = self.tokens(tokens) * self.scale
        x = positional.embed_graph(x, positions, graph)
        if self.token_types is not None:
            types = torch.zeros_like(tokens) if token_types is None else token_types
            x = x + self.token_types(types)
        return self.dropout(self.norm(x))


class Stack(nn.Module):
    """A sequence of blocks followed by an optional final norm (the plain residual stream:
    each block's output is the next block's input)."""

    def __init__(self, blocks: list[nn.Module], final_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm or nn.Identity()

    def make_caches(self, spec: CacheSpec) -> list[nn.Module]:
        """One decoding cache per block call, from `spec`."""
        return [block.make_cache(spec) for block in self.blocks]

    def block_calls(self) -> int:
        """Block applications in one training forward (what FLOP counts multiply the blocks'
        work by): each block once here; depth wirings that reuse blocks say more."""
        return len(self.blocks)

    def call_block(self, block: nn.Module, i: int, x: Tensor, ctx: AttentionContext, caches: list | None, cross: dict) -> Tensor:
        """Run `block` as the i-th block call of this forward (its cache is caches[i]); `cross`
        holds memory/cross_ctx and the cross-attention caches of encoder-decoder blocks.
        Depth wirings that subclass Stack call blocks through this."""
        cache = None if caches is None else caches[i]
        if not cross:
            return block(x, ctx, cache=cache)
        cross_caches = cross.get("cross_caches")
        rest = {k: v for k, v in cross.items() if k != "cross_caches"}
        return block(x, ctx, cache=cache, cross_cache=None if cross_caches is None else cross_caches[i], **rest)

    def forward(self, x: Tensor, ctx: AttentionContext, caches: list | None = None, **cross: object) -> Tensor:
        """x (b, n, d) -> (b, n, d); `cross` holds memory/cross_ctx/cross caches for decoders."""
        for i, block in enumerate(self.blocks):
            x = self.call_block(block, i, x, ctx, caches, cross)
        return self.final_norm(x)


class LMHead(nn.Module):
    """Unembedding to vocabulary logits, optionally tied to the token embedding.

    Args:
        dim, vocab_size: sizes.
        tied: an embedding whose weight is reused (None: own weight).
        scale: multiplies the hidden state first (d ** -0.5 for T5's tied head).
    """

    def __init__(self, dim: int, vocab_size: int, *, tied: nn.Embedding | None, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)
        if tied is not None:
            self.proj.weight = tied.weight
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:  # (b, n, d) -> (b, n, V)
        return self.proj(x * self.scale) if self.scale != 1.0 else self.proj(x)


def make_positions(tokens: Tensor, start: int, positions: Tensor | None) -> Tensor:
    """(b, n) positions: the given ones, or start, start+1, ... for every row."""
    b, n = tokens.shape
    if positions is not None:
        if positions.shape != tokens.shape:
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected {tuple(tokens.shape)} like the tokens")
        return positions.long()
    return torch.arange(start, start + n, device=tokens.device).expand(b, n)


def self_attention_context(
    tokens: Tensor,
    positional: PositionalEncoding,
    *,
    causal: bool,
    num_heads: int,
    positions: Tensor | None = None,
    attention_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    cache: ModelCache | None = None,
    store: list | None = None,
) -> AttentionContext:
    """Build the context of a self-attention stack: positions, padding, user masks, cache.

    attention_mask: (b, n) key padding of these tokens (True/1 = real token).
    attn_mask: bool or additive float, broadcastable to (b, h, n, m) over all keys.
    """
    if tokens.dim() != 2:
        check_tokens(tokens, 1)  # raises the shape error
    b, n = tokens.shape
    start = cache.length if cache is not None else 0
    q_pos = make_positions(tokens, start, positions)
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, length) = "
            f"{tuple(tokens.shape)}, with 1 for real tokens and 0 for padding"
        )
    if cache is not None:
        k_pos, keep = cache.append_positions(q_pos, attention_mask)
        pad = None if bool(keep.all()) else padding_mask(keep)
    else:
        k_pos = q_pos
        pad = None if attention_mask is None else padding_mask(attention_mask)
    m = k_pos.shape[1]
    user_bool, user_bias = split_user_mask(attn_mask)
    if user_bool is not None:
        user_bool = as_4d(user_bool, b, num_heads, n, m)
    if user_bias is not None:
        user_bias = as_4d(user_bias, b, num_heads, n, m)
    return AttentionContext(
        q_pos=q_pos,
        k_pos=k_pos,
        positional=positional,
        mask=combine_masks(pad, user_bool),
        bias=user_bias,
        causal=causal,
        store=store,
    )
