"""The one thing decoding needs from a model: prefill a prompt into a cache, then step.

Legend: `b` batch, `n` prompt length, `s` source length, `V` vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..models.encoder_decoder import EncoderDecoder
from ..nn.kv_cache import ModelCache
from ..nn.positional import PositionalEncoding
from .config import GenerationConfig
from .fast import FastLinears
from .native_step import NativeStep
from .rolling import rolling_cache

Prompt = Tensor | Sequence[int] | Sequence[Sequence[int]]


def as_batch(
    prompts: Prompt, attention_mask: Tensor | None, pad_token_id: int, device: torch.device, *, left: bool = True
) -> tuple[Tensor, Tensor]:
    """Prompts -> padded tokens (b, n) and keep (b, n) bool (True = real token); lists of
    prompts are padded on the left (decoder prompts) or on the right (`left=False`, sources).

    Accepts one prompt (1-D tensor or list of ids), a list of prompts of any lengths, or a 2-D
    tensor with an optional (b, n) attention_mask (1 = real token).
    """
    if isinstance(prompts, Tensor):
        tokens = prompts[None] if prompts.dim() == 1 else prompts
        if tokens.dim() != 2:
            raise ValueError(f"prompt tensor must be 1-D or 2-D (batch, length), got shape {tuple(prompts.shape)}")
        keep = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if keep.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(keep.shape)}; expected {tuple(tokens.shape)} like the prompt")
        tokens, keep = tokens.to(device), keep.to(device)
    else:
        rows = [list(prompts)] if len(prompts) == 0 or isinstance(prompts[0], int) else [list(p) for p in prompts]  # type: ignore[arg-type]
        n = max(len(r) for r in rows)
        tokens = torch.full((len(rows), n), pad_token_id, dtype=torch.long, device=device)
        keep = torch.zeros(len(rows), n, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            if r:
                cols = slice(n - len(r), n) if left else slice(0, len(r))
                tokens[i, cols] = torch.tensor(r, dtype=torch.long, device=device)
                keep[i, cols] = True
    if tokens.shape[1] == 0 or not bool(keep.any(-1).all()):
        raise ValueError("empty prompt: every sequence needs at least one token (e.g. a BOS token)")
    if tokens.is_floating_point():
        raise ValueError(f"prompt must hold integer token ids, got dtype {tokens.dtype}")
    return tokens.long(), keep


def uses_absolute_positions(positional: PositionalEncoding) -> bool:
    """True when the encoding adds absolute position embeddings (so cache positions cannot be re-assigned)."""
    return type(positional).embed is not PositionalEncoding.embed


class Runner:
    """Wraps a DecoderLM or an EncoderDecoder (after encoding its source) as
    prefill(tokens, keep) -> logits and step(tokens) -> logits over one cache."""

    def __init__(self, model: nn.Module, src: Tensor, src_keep: Tensor, config: GenerationConfig) -> None:
        self.model, self.config = model, config
        self.seq2seq = isinstance(model, EncoderDecoder)
        mcfg = model.config  # type: ignore[attr-defined]
        self.max_seq_len = mcfg.max_seq_len
        if self.seq2seq:
            if src.shape[1] > mcfg.max_seq_len:
                raise ValueError(f"source of {src.shape[1]} tokens is longer than max_seq_len={mcfg.max_seq_len}; shorten it")
            self.src_keep = src_keep
            self.memory = model.encode(src, src_keep)  # type: ignore[operator]
            self.num_layers = len(model.decoder.blocks)  # type: ignore[attr-defined]
            self.positional = model.dec_positional  # type: ignore[attr-defined]
        else:
            self.num_layers = len(model.stack.blocks)  # type: ignore[attr-defined]
            self.positional = model.positional  # type: ignore[attr-defined]
        self.cache: ModelCache | None = None
        self.fast = FastLinears(model) if config.compile else None
        self.native: NativeStep | None = None  # the whole step in C++, where it applies (compile=True)

    def start_tokens(self, batch: int, device: torch.device) -> Tensor:
        """The decoder's first input (b, 1) of an encoder-decoder."""
        c = self.config
        start = c.pad_token_id if c.decoder_start_token_id is None else c.decoder_start_token_id
        return torch.full((batch, 1), start, dtype=torch.long, device=device)

    def make_cache(self, batch: int, prompt_len: int) -> ModelCache:
        """A plain cache for prompt + max_new_tokens, or a rolling one when config.window is set."""
        c, mcfg = self.config, self.model.config  # type: ignore[attr-defined]
        p = next(self.model.parameters())
        if c.window is not None:
            if uses_absolute_positions(self.positional):
                raise ValueError(
                    f"a rolling cache re-assigns positions, which needs a relative positional encoding "
                    f"(rope, alibi, t5, none); this model uses '{mcfg.positional.kind}'. Drop `window`"
                )
            return rolling_cache(batch, self.num_layers, mcfg.num_kv_heads, mcfg.head_dim, sinks=c.sink_tokens, window=c.window,
                                 dtype=p.dtype, device=p.device, cross=self.seq2seq)
        total = prompt_len + c.max_new_tokens
        if prompt_len > self.max_seq_len:
            raise ValueError(
                f"prompt of {prompt_len} tokens is longer than the model's window max_seq_len={self.max_seq_len}: "
                "shorten it, or set `window` for a rolling (sink + window) cache"
            )
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({c.max_new_tokens}) = {total} exceeds max_seq_len="
                f"{self.max_seq_len}: lower max_new_tokens, or set `window` for a rolling cache"
            )
        # the fast CPU decoding path keeps a bf16/fp16 model's keys/values in fp32: exact (every
        # bf16 value is an fp32 value), and one-query attention runs much faster in fp32 on CPU
        wide = c.compile and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)
        return self.model.make_cache(batch, total, dtype=torch.float32 if wide else None)  # type: ignore[operator]

    def _forward(self, tokens: Tensor, keep: Tensor | None) -> Tensor:
        cache = self.cache
        assert cache is not None
        ones = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep
        positions = cache.next_positions(ones)
        if self.seq2seq:
            return self.model.decode(tokens, self.memory, self.src_keep, cache=cache, positions=positions, attention_mask=keep)  # type: ignore[operator]
        return self.model(tokens, cache, positions, attention_mask=keep)

    def prefill(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Run the (b, n) prompt through a fresh cache; logits (b, V) of the last position."""
        self.cache = self.make_cache(tokens.shape[0], tokens.shape[1])
        self.native = None
        chunk = self.config.window or tokens.shape[1]
        for i in range(0, tokens.shape[1], chunk):
            logits = self._forward(tokens[:, i : i + chunk], keep[:, i : i + chunk])
        if self.fast is not None and not self.seq2seq:
            self.native = NativeStep.create(self.model, self.cache)
        return logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Feed (b, 1) new tokens; logits (b, V)."""
        if self.native is not None:
            return self.native(tokens)
        if self.fast is None:
            return self._forward(tokens, None)[:, -1]
        with self.fast:
            return self._forward(tokens, None)[:, -1]
