"""Logit processors as pure functions over next-token logits.

Legend: `b` batch (or batch x beams), `V` vocabulary, `t` tokens seen so far.
Every function takes float logits (b, V) and returns new logits (b, V); filtered-out tokens
get -inf. They can be composed in any order; `process_logits` applies them in the usual one
(penalties first, then temperature, top-k, top-p, min-p).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import GenerationConfig


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by `temperature` (> 0): below 1 sharpens, above 1 flattens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}; use greedy decoding for 0")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the `k` largest logits of each row (Fan et al. 2018); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probability sums to at least `p` in (0, 1]; the most likely token is always kept."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (b, V) ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)  # probability mass up to and including each token
    drop_sorted = cum <= 1.0 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below `p` times
    the top token's probability; p in [0, 1]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p}")
    if p == 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = p * probs.max(-1, keepdim=True).values  # (b, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def repetition_penalty(logits: Tensor, tokens: Tensor, penalty: float, keep: Tensor | None = None) -> Tensor:
    """Penalise every token already in `tokens` (b, t) (Keskar et al. 2019, CTRL): positive
    logits are divided by `penalty`, negative ones multiplied. keep (b, t) marks real tokens."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {penalty}")
    if penalty == 1.0:
        return logits
    if keep is not None:  # point padding at a scratch column past the vocabulary
        tokens = tokens.masked_fill(~keep.bool(), logits.shape[-1])
    padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=-1)  # (b, V+1)
    seen = padded.gather(-1, tokens)  # (b, t)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(-1, tokens, seen)[..., :-1]


def banned_ngram_tokens(sequence: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already present in `sequence`."""
    if n <= 0 or len(sequence) < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1 :])
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix]


def no_repeat_ngram(logits: Tensor, sequences: list[list[int]], n: int) -> Tensor:
    """Forbid tokens that would complete an n-gram already in each row's sequence (Paulus et
    al. 2018). sequences: one list of real (unpadded) token ids per row."""
    if n <= 0:
        return logits
    out = logits.clone()
    for row, seq in enumerate(sequences):
        banned = banned_ngram_tokens(seq, n)
        if banned:
            out[row, banned] = float("-inf")
    return out


def process_logits(logits: Tensor, history: Tensor, keep: Tensor, config: GenerationConfig) -> Tensor:
    """Apply the config's penalties and filters to next-token logits (b, V) in fp32.

    history (b, t): every token so far (prompt and generated); keep (b, t): True for real ones.
    """
    logits = logits.float()
    if config.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, history, config.repetition_penalty, keep)
    if config.no_repeat_ngram_size > 0:
        rows = [h[k].tolist() for h, k in zip(history, keep)]
        logits = no_repeat_ngram(logits, rows, config.no_repeat_ngram_size)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return min_p_filter(logits, config.min_p)


def pick_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Next tokens (b,) from processed logits (b, V): arg-max, or a sample when sampling."""
    if config.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
