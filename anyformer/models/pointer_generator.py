"""Pointer-generator encoder-decoder (See et al. 2017, "Get To The Point") with explicit copy
evidence: at each target position t the output distribution mixes the vocabulary softmax with a
copy distribution over the source tokens,

    p(w) = g * p_vocab(w) + (1 - g) * sum_{j : src_j = w} a_t(j),

where a_t = softmax over the source positions j (padding excluded) of

    (W_q h_t) . (W_k m_j) / sqrt(d) + sum_k w_k M_k(t, j) + f a_{t-1}(j - 1),

h is the decoder's final hidden state and m the encoder's output. M_k(t, j) = 1 when the
decoder's last k inputs (up to and including position t's) equal the k source tokens just
before j: the explicit form of an induction head, which continues a source span the translation
is following from the first step (a translation memory laid out as <s> target </s> after the
source is copied from its start), where learned attention needs many steps to find it. The
follow term moves the last position's copy attention one source position on (a_{-1} = 0), so a
copy that is following a span keeps to it where a stretch of it repeats, which matches alone
cannot tell apart. The gate is g = sigmoid(w_g . h + b_g + sum_k u_k A_k(t)) with A_k(t) = 1
when some unpadded j has M_k(t, j) = 1. See et al.'s model is w = u = f = 0; here they start at
w_k = 2, u_k = -1, f = 4 and are trained.

Copying needs source and target ids in one vocabulary (a shared tokenizer). The model returns
log p as its logits, so the usual cross-entropy, softmax, sampling and beam search apply
unchanged (log_softmax(log p) = log p); training may ask for log p of the labels alone
(`forward(..., labels=)`), which skips the (b, n, V) mixture. Cached decoding keeps the last
K - 1 decoder inputs and the last copy attention in the cache's per-row state, reordered with
it in beam search.

Legend: `b` batch, `s` source length, `n` target length, `d` width, `V` vocabulary, `K` the
longest match (3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ConfigError, ModelConfig
from .encoder_decoder import EncoderDecoder, standard_parts
from .parts import Parts
from .registry import ARCHITECTURES


_NO_TOKEN, _NO_SOURCE = -1, -2  # fillers before the first decoder input / source token: they never match
_MATCH_SCORE, _MATCH_GATE, _FOLLOW = 2.0, -1.0, 4.0  # initial w_k, u_k and f (module docstring)


class PointerGenerator(EncoderDecoder):
    """An encoder-decoder whose output may copy source tokens (see the module docstring).
    `scores_labels`: forward(..., labels=y) returns log p(y) alone, which a task's loss may use.

    Args (besides EncoderDecoder's): copy_query, copy_key: the projections of the copy
    attention; gate: the generation gate's linear layer (d -> 1); match_order: K, the longest
    match of decoder inputs against source tokens that counts.
    """

    scores_labels = True

    def __init__(self, config: ModelConfig, *, copy_query: nn.Linear, copy_key: nn.Linear, gate: nn.Linear, match_order: int = 3,
                 **parts: Any) -> None:
        super().__init__(config, **parts)
        if match_order < 1:
            raise ConfigError(f"the pointer-generator's match order must be at least 1, got {match_order}")
        self.copy_query, self.copy_key, self.gate = copy_query, copy_key, gate
        self.match_weights = nn.Parameter(torch.empty(match_order))  # w_k: copy score of a k-token match
        self.match_gate = nn.Parameter(torch.empty(match_order))  # u_k: gate logit when some k-token match exists
        self.follow = nn.Parameter(torch.empty(()))  # f: copy score of the position after the last step's copy
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        nn.init.constant_(self.match_weights, _MATCH_SCORE)
        nn.init.constant_(self.match_gate, _MATCH_GATE)
        nn.init.constant_(self.follow, _FOLLOW)

    def mix(self, h: Tensor, memory: Tensor, src: Tensor, src_mask: Tensor | None, matches: Tensor, *,
            labels: Tensor | None = None, previous: Tensor | None = None, last_only: bool = False,
            key: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decoder states h (b, n, d), encoder output memory (b, s, d), source ids src (b, s),
        its padding mask (b, s) (True = real), the matches M (b, n, s, K) and the copy attention
        of the position before these (b, s) (`previous`; none before the first) -> (log p
        (b, n, V) in fp32, the last position's copy attention (b, s)). With `labels` (b, n), log
        p(labels) (b, n) alone, which training needs and which costs no (b, n, V) mixture
        (labels outside the vocabulary, e.g. ignored positions, score 0); with `last_only`,
        the last position's (b, 1, V). `key`: the copy keys of `memory` (b, s, d) when already
        computed (decoding computes them once per source, `copy_keys`)."""
        if src_mask is not None:
            matches = matches & src_mask.bool()[:, None, :, None]
        with torch.autocast(h.device.type, enabled=False):  # the copy part in fp32 (autocast would round its products)
            hf, m = h.float(), matches.float()
            key = self.copy_keys(memory) if key is None else key
            scores = F.linear(hf, self.copy_query.weight.float()) @ key.transpose(1, 2) * h.shape[-1] ** -0.5  # (b, n, s)
            scores = scores + m @ self.match_weights.float()
            if src_mask is not None:
                scores = scores.masked_fill(~src_mask.bool()[:, None, :], float("-inf"))
            attn = self._follow(scores, previous)  # (b, n, s)
            gate = F.linear(hf, self.gate.weight.float(), self.gate.bias.float()) + m.amax(2) @ self.match_gate.float()[:, None]
        last = attn[:, -1]
        if last_only:
            h, attn, gate = h[:, -1:], attn[:, -1:], gate[:, -1:]
        logits = self.lm_head(h)  # the one large product: under autocast it runs in the low precision
        with torch.autocast(h.device.type, enabled=False):
            tiny = torch.finfo(torch.float32).tiny
            if labels is None:
                p_vocab = torch.softmax(logits.float(), -1)  # (b, n, V)
                p_copy = torch.zeros_like(p_vocab).scatter_add_(-1, src[:, None, :].expand(-1, h.shape[1], -1), attn)
                g = torch.sigmoid(gate)
                return torch.log((g * p_vocab + (1 - g) * p_copy).clamp_min(tiny)), last
            valid = (labels >= 0) & (labels < logits.shape[-1])
            y = labels.where(valid, 0)
            # log p_vocab(y) (b, n): cross-entropy's fused log-softmax and pick, the cheapest form on CPU
            log_vocab = -F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            p_copy = (attn * (src[:, None, :] == y[..., None])).sum(-1)  # (b, n)
            gate = gate[..., 0]
            out = torch.logaddexp(F.logsigmoid(gate) + log_vocab, F.logsigmoid(-gate) + torch.log(p_copy.clamp_min(tiny)))
            return out.where(valid, 0.0), last

    def copy_keys(self, memory: Tensor) -> Tensor:
        """The copy attention's keys (b, s, d) of the encoder output, in fp32."""
        with torch.autocast(memory.device.type, enabled=False):
            return F.linear(memory.float(), self.copy_key.weight.float())

    def _follow(self, scores: Tensor, previous: Tensor | None) -> Tensor:
        """Copy attention (b, n, s) from scores (b, n, s) (padding at -inf), position by
        position: each adds f times the previous position's attention moved one source position
        on, so a copy that is following a span continues it where the span repeats."""
        b, n, s = scores.shape
        prev = scores.new_zeros(b, s) if previous is None else previous.float()
        f = self.follow.float()
        out = []
        for t in range(n):
            moved = F.pad(prev[:, :-1], (1, 0))  # moved[:, j] = prev[:, j - 1]
            prev = torch.softmax(scores[:, t] + f * moved, -1)
            out.append(prev)
        return torch.stack(out, 1)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None, *,
                attn_store: list | None = None, labels: Tensor | None = None) -> Tensor:
        """Teacher-forced log-probabilities (b, n, V) of target `tgt` given source `src`; with
        `labels` (b, n), only those of the labels (b, n) (see `mix`)."""
        memory = self.encode(src, src_mask, attn_store=attn_store)
        h = self.decode_hidden(tgt, memory, src_mask, attention_mask=tgt_mask, attn_store=attn_store)
        K = self.match_weights.numel()
        history = torch.cat([tgt.new_full((tgt.shape[0], K - 1), _NO_TOKEN), tgt], 1)
        return self.mix(h, memory, src, src_mask, self.matches(history, src), labels=labels)[0]

    def matches(self, history: Tensor, src: Tensor) -> Tensor:
        """history (b, K - 1 + n): K - 1 earlier decoder inputs, then the n current ones; source
        ids src (b, s) -> M (b, n, s, K): M[..., t, j, k - 1] is whether the last k inputs at
        position t equal src[j - k : j]."""
        K = self.match_weights.numel()
        b, s = src.shape
        n = history.shape[1] - (K - 1)
        before = torch.cat([src.new_full((b, K), _NO_SOURCE), src], 1)  # before[:, K + j - k] = src[j - k]
        out = torch.empty(b, n, s, K, dtype=torch.bool, device=src.device)
        run = torch.ones(b, n, s, dtype=torch.bool, device=src.device)
        for k in range(1, K + 1):
            mine = history[:, K - k : K - k + n]  # (b, n): the input k - 1 steps back
            theirs = before[:, K - k : K - k + s]  # (b, s): the source token k steps before j
            run = run & (mine[:, :, None] == theirs[:, None, :])
            out[..., k - 1] = run
        return out

    def encode_source(self, src: Tensor, src_keep: Tensor) -> Any:
        """Protocol: the encoder's output, the source's key padding, the source ids and the copy
        keys (computed once per source, not per step)."""
        memory, keep = super().encode_source(src, src_keep)
        return memory, keep, src, self.copy_keys(memory)

    def decode_step(self, tokens: Tensor, cache: Any, positions: Tensor, *, attention_mask: Tensor | None = None, source: Any = None,
                    last_only: bool = False) -> Tensor:
        """Protocol: (b, n) decoder tokens through the cache -> log p (b, n, V), or (b, 1, V)
        of the last position with `last_only`. The cache's per-row state keeps the last K - 1
        inputs (for the matches) and the last copy attention (for the follow term)."""
        memory, src_keep, src, key = source
        h = self.decode_hidden(tokens, memory, src_keep, cache=cache, positions=positions, attention_mask=attention_mask)
        K = self.match_weights.numel()
        recent = cache.rows.get("pointer_recent")  # the last K - 1 decoder inputs before these
        if recent is None:
            recent = tokens.new_full((tokens.shape[0], K - 1), _NO_TOKEN)
        history = torch.cat([recent, tokens], 1)
        cache.rows["pointer_recent"] = history[:, history.shape[1] - (K - 1) :]
        out, cache.rows["pointer_attention"] = self.mix(h, memory, src, src_keep, self.matches(history, src),
                                                        previous=cache.rows.get("pointer_attention"), last_only=last_only, key=key)
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per target token (model summary): the encoder-decoder's count (its
        stacks as their mixers declare them, every weight once, the copy projections and gate
        included) plus the copy scores, one dot product per source token (the copy distribution
        needs no weighted sum of values; the match comparisons are not floating-point work)."""
        from .summary import stack_flops_per_token

        encdec = dataclasses.replace(self.config, arch="encoder_decoder")
        return stack_flops_per_token(self, seq_len, encdec) + 2 * seq_len * self.config.dim

    def decoding_flops_per_token(self, seq_len: int) -> float:
        """FLOPs of one decoding step (model summary): the encoder-decoder's step (summary.
        decoding_flops, which counts every weight outside the encoder) less the copy keys, computed
        once per source, plus the copy attention's scores over the `seq_len` source tokens."""
        from .summary import decoding_flops

        keys = 2 * self.copy_key.weight.numel()
        return float(decoding_flops(self, seq_len) or 0.0) - keys + 2 * seq_len * self.config.dim


@ARCHITECTURES.register("pointer_generator")
def build_pointer_generator(cfg: ModelConfig, parts: Parts) -> PointerGenerator:
    """An encoder-decoder with a copy distribution over the source (shared vocabulary)."""
    if not cfg.share_embeddings:
        raise ConfigError("model.arch 'pointer_generator' copies source ids into the target vocabulary: set model.share_embeddings=true "
                          "(and a shared tokenizer, e.g. task.options.shared_vocab=true)")
    return PointerGenerator(
        cfg,
        **standard_parts(cfg, parts),
        copy_query=nn.Linear(cfg.dim, cfg.dim, bias=False),
        copy_key=nn.Linear(cfg.dim, cfg.dim, bias=False),
        gate=nn.Linear(cfg.dim, 1),
    )
