"""Decoding without a cache: every step recomputes the last `context` tokens. This is how a
model with absolute positions (learned, sinusoidal) keeps generating past its max_seq_len,
where a rolling cache cannot re-assign positions. Logit processing and token picking are
those of the cached decoder (`process_logits`, `pick_tokens`), so every GenerationConfig
setting (temperature, top-k, top-p, min-p, penalties, seed, stop tokens) means the same here.

Legend: `b` batch, `n` prompt length, `t` tokens so far, `V` vocabulary.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .config import GenerationConfig
from .logits import pick_tokens, process_logits
from .runner import Prompt, as_batch


def _check(config: GenerationConfig, context: int) -> GenerationConfig:
    config.validate()
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    if config.num_beams > 1:
        raise ValueError("windowed decoding picks one token per step; beam search (num_beams > 1) needs generate() with a cache")
    if config.stop_strings:
        raise ValueError("windowed decoding stops at stop_tokens only; stop_strings need stream()/generate()")
    return config


@torch.inference_mode()
def window_steps(model: nn.Module, prompts: Prompt, config: GenerationConfig, *, context: int | None = None) -> Iterator[Tensor]:
    """Yield (b,) next tokens per step, each from model(tokens[:, -context:]) (no cache).

    model: a decoder LM (`model(tokens)` -> (b, t, V) logits); prompts: one prompt or several
    of the same length (a list of ids, a list of lists, or a (b, n) tensor); context: the
    longest window fed to the model (default: model.config.max_seq_len). `config.window` and
    `config.compile` do not apply. Rows that hit a stop token are then filled with
    pad_token_id; the loop ends when every row has stopped or after max_new_tokens.
    """
    context = context if context is not None else model.config.max_seq_len  # type: ignore[attr-defined]
    config = _check(config, context)
    device = next(model.parameters()).device
    tokens, keep = as_batch(prompts, None, config.pad_token_id, device)  # (b, n)
    if not bool(keep.all()):
        raise ValueError("windowed decoding takes prompts of one length (no padding); decode them one at a time")
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    stop_ids = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    for _ in range(config.max_new_tokens):
        logits = model(tokens[:, -context:])[:, -1]  # (b, V)
        nxt = pick_tokens(process_logits(logits, tokens, keep, config), config, generator)  # (b,)
        nxt = nxt.masked_fill(done, config.pad_token_id)
        tokens = torch.cat([tokens, nxt[:, None]], 1)  # (b, t + 1)
        keep = torch.cat([keep, ~done[:, None]], 1)
        if config.stop_tokens:
            done = done | torch.isin(nxt, stop_ids)
        yield nxt
        if bool(done.all()):
            return


def stream_window(model: nn.Module, prompt: Prompt, config: GenerationConfig, *, context: int | None = None) -> Iterator[int]:
    """Yield the new token ids of one prompt, recomputing the last `context` tokens per step
    (see `window_steps`); a stop token, when hit, is the last id yielded."""
    for nxt in window_steps(model, prompt, config, context=context):
        if nxt.shape[0] != 1:
            raise ValueError(f"stream_window() takes one prompt, got a batch of {nxt.shape[0]}; use window_steps()")
        yield int(nxt[0])
