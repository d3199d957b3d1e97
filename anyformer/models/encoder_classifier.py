"""The encoder-classifier assembly that the models of one input each share (ViT images, point
clouds, ...): the input's tokens and positions from the model's own embedder, a bidirectional
stack, and a head on the final states.

Legend: `b` batch, `n` tokens, `d` width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.attention import AttentionContext
from ..nn.positional import PositionalEncoding
from .common import Stack


class EncoderClassifier(nn.Module):
    """Input -> tokens (`tokens`) -> bidirectional encoder blocks -> final norm -> head
    (`classify`); a subclass says how its input becomes tokens.

    Args:
        config: the model config.
        embedder: the module that turns an input into tokens, held under `embed_name` (the
            name its checkpoints use; registered first, so that initialisation draws in the
            order it always has).
        positional, stack, head: the position encoding, the encoder stack, the head.
    """

    causal = False

    def __init__(self, config: ModelConfig, embed_name: str, embedder: nn.Module, positional: PositionalEncoding, stack: Stack,
                 head: nn.Module) -> None:
        super().__init__()
        self.config = config
        setattr(self, embed_name, embedder)
        self.positional, self.stack, self.head = positional, stack, head

    def tokens(self, inputs: Any) -> tuple[Tensor, Tensor]:
        """The input's tokens (b, n, d), positions applied, and their positions (b, n)."""
        raise NotImplementedError

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random inputs of the configured shape."""
        raise NotImplementedError

    def tokens_per_input(self) -> int:
        """The tokens one input becomes (its patches or groups plus the class tokens): the
        length the model summary counts FLOPs at."""
        raise NotImplementedError

    def input_device(self) -> torch.device:
        """The device the model's parameters are on (where its inputs go)."""
        return next(self.parameters()).device

    def classify(self, hidden: Tensor) -> Tensor:
        """The head's output (class logits (b, classes), or the pooled state) of the final states (b, n, d)."""
        return self.head(hidden)

    def hidden(self, inputs: Any, *, attn_store: list | None = None) -> Tensor:
        """The final hidden states (b, n, d) of a batch of inputs."""
        x, positions = self.tokens(inputs)
        ctx = AttentionContext(q_pos=positions, k_pos=positions, positional=self.positional, store=attn_store)
        return self.stack(x, ctx)

    def forward(self, inputs: Any, *, attn_store: list | None = None) -> Tensor:
        """The head's output for a batch of inputs."""
        return self.classify(self.hidden(inputs, attn_store=attn_store))
