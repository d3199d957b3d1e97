"""What decoding does with any model of the protocol: prefill a prompt into a cache, then step.

Legend: `b` batch, `n` prompt length, `s` source length, `V` vocabulary.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..protocol import DecodingInfo
from .config import GenerationConfig
from .fast import FastLinears, fast_path_available

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


def decoding_info(model: nn.Module) -> DecodingInfo:
    """The model's DecodingInfo; a model that generation cannot drive gets a clear error."""
    if not callable(getattr(model, "decoding_info", None)):
        arch = getattr(getattr(model, "config", None), "arch", None)
        what = f"{type(model).__name__}" + (f" (arch '{arch}')" if arch else "")
        raise ValueError(
            f"generate needs a model that decodes (a decoder-only or encoder-decoder model); {what} does not. "
            "Encoders are used through their heads: fill-mask, classify, embed"
        )
    return model.decoding_info()  # type: ignore[no-any-return]


class Runner:
    """Drives any model of the protocol (anyformer.protocol) as prefill(tokens, keep) ->
    logits and step(tokens) -> logits over one cache; an encoder-decoder's source is encoded
    once, first."""

    def __init__(self, model: nn.Module, src: Tensor, src_keep: Tensor, config: GenerationConfig) -> None:
        self.model, self.config = model, config
        info = self.info = decoding_info(model)
        self.seq2seq = info.encoder_decoder
        self.max_seq_len = info.max_seq_len
        self.source = model.encode_source(src, src_keep) if self.seq2seq else None  # type: ignore[operator]
        self.cache: Any = None
        self.fast = FastLinears(model) if config.compile and fast_path_available(model) else None

    def start_tokens(self, batch: int, device: torch.device) -> Tensor:
        """The decoder's first input (b, 1) of an encoder-decoder."""
        start = self.config.decoder_start_token_id
        start = self.info.decoder_start_token_id if start is None else start
        if start is None:
            raise ValueError(
                "this encoder-decoder does not know its first decoder token: pass decoder_start_token_id= "
                "(the id the model was trained to start from; T5 uses its pad id 0)"
            )
        return torch.full((batch, 1), start, dtype=torch.long, device=device)

    def make_cache(self, batch: int, prompt_len: int) -> Any:
        """A plain cache for prompt + max_new_tokens, or a rolling one when config.window is set."""
        c = self.config
        p = next(self.model.parameters())
        lc = self.info.long_context
        if lc is not None:  # the model reads any length through its own Λ cache
            if c.window is not None:
                raise ValueError(f"this model keeps its own long-context cache (the first {lc.sinks} tokens and the last {lc.window}); "
                                 "drop `window`")
            return self.model.make_cache(batch, dtype=p.dtype, device=p.device, window=lc.window, sinks=lc.sinks,  # type: ignore[operator]
                                         true_positions=True)
        if c.window is not None:
            return self.model.make_cache(batch, dtype=p.dtype, device=p.device, window=c.window, sinks=c.sink_tokens)  # type: ignore[operator]
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
        wide = self.fast is not None and p.dtype in (torch.bfloat16, torch.float16)
        return self.model.make_cache(batch, total, dtype=torch.float32 if wide else None)  # type: ignore[operator]

    def _forward(self, tokens: Tensor, keep: Tensor | None, last_only: bool = False) -> Tensor:
        cache = self.cache
        ones = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep
        positions = cache.next_positions(ones)
        return self.model.decode_step(tokens, cache, positions, attention_mask=keep, source=self.source,  # type: ignore[operator]
                                      last_only=last_only)

    def prefill(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Run the (b, n) prompt through a fresh cache; logits (b, V) of the last position."""
        self.cache = self.make_cache(tokens.shape[0], tokens.shape[1])
        lc = self.info.long_context
        chunk = self.config.window or (lc.window if lc is not None else tokens.shape[1])
        for i in range(0, tokens.shape[1], chunk):
            # only the last position's logits are used: the model may skip the head for the rest
            logits = self._forward(tokens[:, i : i + chunk], keep[:, i : i + chunk], last_only=True)
        return logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Feed (b, 1) new tokens; logits (b, V)."""
        if self.fast is None:
            return self._forward(tokens, None)[:, -1]
        with self.fast:
            return self._forward(tokens, None)[:, -1]
