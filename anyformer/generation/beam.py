"""Beam search with a length penalty, for decoder-only and encoder-decoder models.

Legend: `b` batch, `k` beams, `c` candidates per step (2k, or more with several stop
tokens), `L` prompt length + max_new_tokens, `V` vocabulary.

Each step extends every live beam by every token, keeps the c best by summed log-probability,
moves candidates ending in a stop token (or reaching the length limit) to the finished set
with score sum_logprob / new_len ** length_penalty, and continues with the k best others.
Search stops when no live beam can beat the worst of k finished ones (with the current
length as the estimate) or at max_new_tokens; the best finished sequence is returned. This
is the procedure of Hugging Face transformers' `generate(num_beams=k)` with its default
`early_stopping=False`, so the two give the same tokens on the same weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .logits import process_logits
from .runner import Prompt, Runner, as_batch, decoding_info

if TYPE_CHECKING:
    from .config import GenerationConfig

_NEG = -1.0e9


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Select along dim 1: x (b, c, ...) and index (b, j) -> (b, j, ...)."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape))


def beam_search(model: nn.Module, prompts: Prompt, config: "GenerationConfig", *, attention_mask: Tensor | None = None) -> Tensor:
    """The best beam per prompt: (b, n + new) ids for a DecoderLM, (b, 1 + new) decoder ids
    for an EncoderDecoder; positions after a sequence's end hold pad_token_id."""
    k, pad = config.num_beams, config.pad_token_id
    device = next(model.parameters()).device
    seq2seq = decoding_info(model).encoder_decoder
    src, src_keep = as_batch(prompts, attention_mask, pad, device, left=not seq2seq)
    b = src.shape[0]
    runner = Runner(model, src.repeat_interleave(k, 0), src_keep.repeat_interleave(k, 0), config)
    if seq2seq:
        tokens = runner.start_tokens(b * k, device)
        keep = torch.ones_like(tokens, dtype=torch.bool)
    else:
        tokens, keep = src.repeat_interleave(k, 0), src_keep.repeat_interleave(k, 0)
    n = tokens.shape[1]
    total = n + config.max_new_tokens
    stop_ids = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    c = max(2, 1 + len(config.stop_tokens)) * k
    top_k_mask = torch.arange(c, device=device) < k  # (c,) only the k best may finish

    running = torch.full((b, k, total), pad, dtype=torch.long, device=device)
    running[:, :, :n] = tokens.view(b, k, n)
    run_keep = torch.ones(b, k, total, dtype=torch.bool, device=device)
    run_keep[:, :, :n] = keep.view(b, k, n)
    run_scores = torch.zeros(b, k, device=device)
    run_scores[:, 1:] = _NEG  # identical beams at the start: only the first one expands
    fin = running.clone()
    fin_scores = torch.full((b, k), _NEG, device=device)
    fin_len = torch.zeros(b, k, dtype=torch.long, device=device)
    fin_flag = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    offsets = (torch.arange(b, device=device) * k)[:, None]  # (b, 1)

    logits = runner.prefill(tokens, keep)
    cur = n
    while True:
        logp = torch.log_softmax(logits.float(), -1)  # (b*k, V)
        hist = running[:, :, :cur].reshape(b * k, cur)
        logp = process_logits(logp, hist, run_keep[:, :, :cur].reshape(b * k, cur), config)
        V = logp.shape[-1]
        acc = (logp.view(b, k, V) + run_scores[:, :, None]).view(b, k * V)
        top_scores, top_idx = torch.topk(acc, c)  # (b, c)
        src_beam, tok = top_idx // V, top_idx % V
        cand = _gather(running, src_beam)  # (b, c, L)
        cand[:, :, cur] = tok
        hits = torch.isin(tok, stop_ids) | (cur + 1 >= total)  # (b, c)

        live_scores = top_scores + hits.float() * _NEG
        nxt = torch.topk(live_scores, k).indices  # (b, k)
        running, run_scores, parent = _gather(cand, nxt), _gather(live_scores, nxt), _gather(src_beam, nxt)

        just = hits & top_k_mask[None]
        new_len = cur + 1 - n
        scores = top_scores / (new_len**config.length_penalty)
        scores = scores + (~improvable).float() * _NEG + (~just).float() * _NEG
        merged = torch.topk(torch.cat([fin_scores, scores], 1), k).indices  # (b, k)
        fin = _gather(torch.cat([fin, cand], 1), merged)
        fin_scores = _gather(torch.cat([fin_scores, scores], 1), merged)
        fin_len = _gather(torch.cat([fin_len, torch.full_like(scores, new_len, dtype=torch.long)], 1), merged)
        fin_flag = _gather(torch.cat([fin_flag, just], 1), merged)

        runner.cache.reorder((parent + offsets).reshape(-1))  # type: ignore[union-attr]
        cur += 1
        best_live = run_scores[:, :1] / ((cur - n) ** config.length_penalty)
        worst_fin = torch.where(fin_flag, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, _NEG))
        improvable = improvable & (best_live > worst_fin).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        logits = runner.step(running[:, :, cur - 1].reshape(b * k, 1))

    best, best_len = fin[:, 0], fin_len[:, 0]  # (b, L), (b,)
    out_len = n + int(best_len.max())
    cols = torch.arange(total, device=device)[None]
    best = best.masked_fill(cols >= n + best_len[:, None], pad)
    return best[:, :out_len]
