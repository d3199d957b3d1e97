"""A small sampling loop over model.forward(tokens): temperature and top-k, one token at a time.

It recomputes the whole (cropped) context at every step; the generation package offers a
cached decoder for long outputs. Legend: `b` batch, `n` length, `V` vocabulary.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn


@torch.no_grad()
def sample_stream(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield (b,) next-token ids, one step at a time, continuing `prompt` (b, n).

    context: the longest window fed to the model (its max_seq_len); temperature 0 is greedy;
    top_k keeps the k most likely tokens before sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -context:])[:, -1].float()  # (b, V)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (b,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        yield nxt
