"""The model protocol: what generation (and any other code that drives a model from outside)
may call on a model. Nothing else of a model is read from outside it.

A generative model (decoder LM, encoder-decoder, or any registered architecture that decodes)
implements:

- `decoding_info() -> DecodingInfo`: static facts decoding needs (is the prompt a source
  sequence, the context length, whether positions are absolute).
- `encode_source(src, src_keep) -> source`: encoder-decoders run the encoder once; the opaque
  result goes back into every `decode_step` (decoder-only models return None).
- `make_cache(batch, max_len=None, *, dtype=None, device=None, window=None, sinks=4,
  true_positions=False) -> cache`: a cache for `batch` sequences; with `window`, a rolling cache
  of `sinks` first tokens plus the `window` most recent ones (with `true_positions`, a Λ cache
  whose keys keep their own positions, for models whose DecodingInfo has `long_context`). Each layer decides what it stores (keys and values, a recurrent
  state, ...). The cache offers `length`, `next_positions(keep)` and `reorder(index)` (beams).
- `decode_step(tokens, cache, positions, *, attention_mask=None, source=None, last_only=False)
  -> logits`: run (b, n) tokens at (b, n) positions through the cache (extending it) -> (b, n, V)
  logits; with `last_only`, the last position's only, (b, 1, V): all that a prefill needs (a
  model may then skip the vocabulary projection of the others).

Every model, generative or not, implements:

- `example_inputs(batch, generator, length=None) -> tuple`: random but valid positional inputs of
  one forward pass (`length` tokens, default the context; an image, a point cloud or a
  spectrogram of the configured size, which ignore `length`): what the conformance suite and
  FLOP counting feed a model without knowing its architecture. A model whose input always
  becomes the same number of tokens also offers `tokens_per_input()`, the length its summary
  counts at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class DecodingInfo:
    """What decoding needs to know about a model.

    encoder_decoder: prompts are source sequences and decoding starts from a start token;
    max_seq_len: the longest sequence (prompt plus new tokens) a plain cache may hold;
    absolute_positions: positions are added to the input embeddings (a rolling cache, which
    re-assigns positions, cannot be used); positional: the positional kind, for messages;
    decoder_start_token_id: an encoder-decoder's first decoder token, when the model knows it;
    long_context: set when the model reads past max_seq_len through a Λ cache (LM-Infinite):
    decoding then keeps that cache instead of a plain one, whatever the length.
    """

    encoder_decoder: bool
    max_seq_len: int
    absolute_positions: bool
    positional: str
    decoder_start_token_id: int | None = None
    long_context: "LongContext | None" = None


@dataclass(frozen=True)
class LongContext:
    """How a model reads past its trained context: attention to the first `sinks` tokens and the
    `window` most recent ones, each key at its true position (anyformer.longcontext)."""

    window: int
    sinks: int


@runtime_checkable
class Decodable(Protocol):
    """A model that generation can drive (see the module docstring)."""

    def decoding_info(self) -> DecodingInfo: ...

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any: ...

    def make_cache(self, batch: int, max_len: int | None = None, **kwargs: Any) -> Any: ...

    def decode_step(self, tokens: Tensor, cache: Any, positions: Tensor, *, attention_mask: Tensor | None = None, source: Any = None,
                    last_only: bool = False) -> Tensor: ...
