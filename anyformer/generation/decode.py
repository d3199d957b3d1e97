"""Greedy and sampled decoding with a KV cache: `generate` for whole batches, `stream` and
`stream_text` for one prompt, token by token.

Legend: `b` batch, `n` prompt length, `t` tokens so far, `V` vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .beam import beam_search
from .config import GenerationConfig
from .logits import pick_tokens, process_logits
from .runner import Prompt, Runner, as_batch, decoding_info

Decode = Callable[[list[int]], str]


def _config(config: GenerationConfig | None, overrides: dict[str, Any], decode: Decode | None) -> GenerationConfig:
    cfg = (config or GenerationConfig()).with_overrides(**overrides).validate()
    if cfg.stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` function (token ids -> text) to find them")
    return cfg


def _hit_stop_string(tokens: list[int], stops: list[str], decode: Decode) -> bool:
    text = decode(tokens)
    return any(s in text for s in stops)


def _token_steps(model: nn.Module, prompts: Prompt, config: GenerationConfig, attention_mask: Tensor | None, decode: Decode | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (b,) new tokens per step, with the (b,) `done` flags after it and the prompt (b, n)."""
    device = next(model.parameters()).device
    runner_src, src_keep = as_batch(prompts, attention_mask, config.pad_token_id, device, left=not _is_seq2seq(model))
    runner = Runner(model, runner_src, src_keep, config)
    if runner.seq2seq:
        tokens = runner.start_tokens(runner_src.shape[0], device)
        keep = torch.ones_like(tokens, dtype=torch.bool)
    else:
        tokens, keep = runner_src, src_keep
    b = tokens.shape[0]
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop_ids = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    needs_history = config.repetition_penalty != 1.0 or config.no_repeat_ngram_size > 0
    history, hist_keep = tokens, keep
    done = torch.zeros(b, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(b)]
    logits = runner.prefill(tokens, keep)
    for i in range(config.max_new_tokens):
        scores = process_logits(logits, history, hist_keep, config)
        nxt = pick_tokens(scores, config, generator)
        nxt = nxt.masked_fill(done, config.pad_token_id)
        if needs_history:
            history = torch.cat([history, nxt[:, None]], 1)
            hist_keep = torch.cat([hist_keep, ~done[:, None]], 1)
        was_done = done
        if config.stop_tokens:
            done = done | torch.isin(nxt, stop_ids)
        if config.stop_strings:
            for r, tok in enumerate(nxt.tolist()):
                if not was_done[r]:
                    generated[r].append(tok)
                    if _hit_stop_string(generated[r], config.stop_strings, decode):  # type: ignore[arg-type]
                        done = done.clone()
                        done[r] = True
        yield nxt, done, tokens
        if i + 1 == config.max_new_tokens or bool(done.all()):
            return
        logits = runner.step(nxt[:, None])


def _is_seq2seq(model: nn.Module) -> bool:
    return decoding_info(model).encoder_decoder


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Prompt,
    config: GenerationConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    decode: Decode | None = None,
    **overrides: Any,
) -> Tensor:
    """Generate continuations of a batch of prompts with a KV cache.

    model: any model of the protocol (anyformer.protocol): a DecoderLM, or an EncoderDecoder
      (the prompts are then its source sequences).
    prompts: one prompt (list of ids or 1-D tensor), a list of prompts of different lengths
      (left-padded, each row positioned from 0 at its first real token, so every row decodes
      exactly as it would alone), or a (b, n) tensor with an optional (b, n) attention_mask.
    config: a GenerationConfig; `overrides` replace its fields (e.g. max_new_tokens=20,
      do_sample=True, top_p=0.9, seed=0, num_beams=4, stop_tokens=[eos], window=512).
    decode: token ids -> text, needed for stop_strings.

    Returns (b, n + new) ids for a DecoderLM: the padded prompt then the new tokens, or
    (b, 1 + new) decoder ids (start token first) for an EncoderDecoder. Rows that stop early
    (stop token kept) are filled with pad_token_id; the length is that of the longest row.
    """
    cfg = _config(config, overrides, decode)
    if cfg.num_beams > 1:
        return beam_search(model, prompts, cfg, attention_mask=attention_mask)
    out: list[Tensor] = []
    prompt = None
    for nxt, _, prompt in _token_steps(model, prompts, cfg, attention_mask, decode):
        out.append(nxt)
    return torch.cat([prompt, torch.stack(out, 1)], 1)  # type: ignore[list-item]


def stream(model: nn.Module, prompt: Prompt, config: GenerationConfig | None = None, *, decode: Decode | None = None, **overrides: Any) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (greedy or sampled).

    Same arguments as `generate` (one prompt only, no beam search). The stop token, when one
    is hit, is the last id yielded.
    """
    cfg = _config(config, overrides, decode)
    if cfg.num_beams > 1:
        raise ValueError("stream() yields tokens one at a time and cannot run beam search; use generate()")
    with torch.inference_mode():
        steps = _token_steps(model, prompt, cfg, None, decode)
        for nxt, _, tokens in steps:
            if tokens.shape[0] != 1:
                raise ValueError(f"stream() takes one prompt, got a batch of {tokens.shape[0]}; use generate() for batches")
            yield int(nxt[0])


def stream_text(model: nn.Module, prompt: Prompt, decode: Decode, config: GenerationConfig | None = None, **overrides: Any) -> Iterator[str]:
    """Yield pieces of generated text as they are produced: each piece is the newly completed
    part of decode(new ids); text ending in an incomplete UTF-8 character is held back."""
    ids: list[int] = []
    emitted = ""
    for tok in stream(model, prompt, config, decode=decode, **overrides):
        ids.append(tok)
        text = decode(ids)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = decode(ids)
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted) :]
