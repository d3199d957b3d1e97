"""What the memory kinds that read a decoder's input in segments share: the model protocol's
answers that do not depend on the memory, and the checks of their inputs."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...protocol import DecodingInfo

ANY_LENGTH = 2**62  # what decoding_info reports as the longest sequence: no limit


class SegmentedDecoder(nn.Module):
    """Base of a memory wrapped around a decoder `self.inner`, reading inputs of any length in
    segments; `what` names it in messages."""

    causal = True
    what = "this memory"

    def check_rows(self, tokens: Tensor, attention_mask: Tensor | None) -> None:
        """Refuse padded rows and inputs that are not (batch, length)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{self.what} reads rows without padding; give sequences of equal length")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")

    def check_decoding(self, attention_mask: Tensor | None = None, window: int | None = None) -> None:
        """Refuse padded prompts and a rolling cache."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{self.what} generates rows of equal length only (no padding); give prompts one at a time")
        if window is not None:
            raise ValueError(f"{self.what} keeps earlier segments in its memory instead of a rolling cache; drop `window`")

    def decoding_info(self) -> DecodingInfo:
        info = self.inner.decoding_info()  # type: ignore[operator]
        return DecodingInfo(encoder_decoder=False, max_seq_len=ANY_LENGTH, absolute_positions=info.absolute_positions,
                            positional=info.positional)

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        raise ValueError(f"{self.what} wraps a decoder; its prompts are decoder tokens")


class SegmentCache(nn.Module):
    """Base of such a memory's decoding state: the wrapped decoder's cache of the current segment
    (made afresh by `make_inner` when a segment is full), how many tokens that segment holds
    (`filled`) and how many were seen in all (`length`); subclasses add the memory."""

    def __init__(self, make_inner: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.make_inner = make_inner
        self.inner = make_inner()
        self.filled = 0
        self.length = 0

    def next_positions(self, keep: Tensor) -> Tensor:
        """Positions (b, n) of new tokens in the whole text (the wrapped model places them by segment)."""
        return self.length + keep.long().cumsum(-1) - 1

    def reorder(self, index: Tensor) -> None:
        self.inner.reorder(index)
