"""RWKV-4 time mixing (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"):
the WKV recurrence, a per-channel weighted average of past values with an exponential decay.

Legend: `b` batch, `n` tokens, `d` width (channels), `c` chunks, `C` chunk size.

Per channel, with decay w = exp(time_decay) > 0, bonus u = time_first, keys k and values v:

    y_t = (sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t) / (same sum without v)

Two forms of the same recurrence:

- `wkv4_recurrent`: one token at a time, carrying the state (a, b, p): the numerator and
  denominator sums scaled by e^{-p}, p their running maximum exponent (the stabilised state
  of the reference implementations; transformers' `rwkv_linear_attention_cpu` is the same).
- `wkv4_chunked`: chunks of C tokens. Inside a chunk every output is a softmax-like average
  over the chunk's earlier tokens and the entering state, computed from the (C, C) exponents
  per channel with one maximum subtracted (so any decay stays in range); a loop over chunks
  (not tokens) carries the state, each step elementwise on (b, d). Linear in n; autograd
  differentiates it as written.

The layer: token shift with three mixes (time_mix_key, time_mix_value, time_mix_receptance),
key/value/receptance/output projections, sigmoid(receptance) * wkv. Parameter names are
transformers' (`RwkvSelfAttention`), so `RwkvForCausalLM` checkpoints map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..kv_cache import CacheSpec
from .context import AttentionContext
from .registry import ATTENTIONS
from .rwkv7 import check_rwkv_config
from .rwkv_channel import RecurrentState, ShiftState, layer_ratios, left_padding_keep, shift_cache, token_shift

EMPTY = -1e38  # the exponent of an empty state (transformers' initial max_state)


# --------------------------------------------------------------------------- pure math


def wkv4_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The recurrence one token at a time. w (d,) decay (> 0), u (d,) bonus, k, v (b, n, d) in
    fp32; state (a, b, p) each (b, d) or None (empty). Returns y (b, n, d) and the state."""
    bsz, n, d = k.shape
    if state is None:
        a, den, p = k.new_zeros(bsz, d), k.new_zeros(bsz, d), k.new_full((bsz, d), EMPTY)
    else:
        a, den, p = state
    ys = []
    for t in range(n):
        kt, vt = k[:, t], v[:, t]
        top = torch.maximum(p, u + kt)
        e1, e2 = (p - top).exp(), (u + kt - top).exp()
        ys.append((e1 * a + e2 * vt) / (e1 * den + e2))
        top = torch.maximum(p - w, kt)
        e1, e2 = (p - w - top).exp(), (kt - top).exp()
        a, den, p = e1 * a + e2 * vt, e1 * den + e2, top
    return torch.stack(ys, 1), (a, den, p)


def wkv4_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None, *,
                 chunk_size: int) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The same recurrence in chunks of `chunk_size` tokens; same arguments as `wkv4_recurrent`.
    Tokens are padded to whole chunks with keys of an empty exponent, which add nothing."""
    bsz, n, d = k.shape
    C = max(1, min(chunk_size, n))
    pad = (-n) % C
    if pad:
        k = torch.cat([k, k.new_full((bsz, pad, d), EMPTY)], 1)
        v = torch.cat([v, v.new_zeros(bsz, pad, d)], 1)
    c = (n + pad) // C
    k, v = k.view(bsz, c, C, d), v.view(bsz, c, C, d)
    steps = torch.arange(C, device=k.device, dtype=k.dtype)
    # what a chunk hands on: its tokens' exponents seen from the chunk's last real token (the
    # last chunk may be shorter: its padding must not decay the state it hands on)
    length = torch.full((c,), float(C), device=k.device, dtype=k.dtype)
    length[-1] = C - pad
    to_end = k - (length[:, None] - 1 - steps)[..., None] * w  # (b, c, C, d)
    m_c = to_end.amax(2)  # (b, c, d)
    e = (to_end - m_c[:, :, None]).exp()
    a_c, b_c = (e * v).sum(2), e.sum(2)  # (b, c, d)
    if state is None:
        a, den, p = k.new_zeros(bsz, d), k.new_zeros(bsz, d), k.new_full((bsz, d), EMPTY)
    else:
        a, den, p = state
    entering = []
    # the state entering each chunk (unbind: one gradient stack, not a full-size zero per chunk)
    for L_i, m_i, a_i, b_i in zip(length.unbind(0), m_c.unbind(1), a_c.unbind(1), b_c.unbind(1)):
        entering.append((a, den, p))
        decayed = p - L_i * w
        top = torch.maximum(decayed, m_i)
        e1, e2 = (decayed - top).exp(), (m_i - top).exp()
        a, den, p = e1 * a + e2 * a_i, e1 * den + e2 * b_i, top
    a_in, b_in, p_in = (torch.stack(t, 1) for t in zip(*entering))  # (b, c, d) each
    # token t of a chunk reads token j < t at exponent k_j - (t-1-j) w, itself at u + k_t, and
    # the entering state at p - t w
    gap = (steps[:, None] - 1 - steps[None, :])  # (C, C) t - 1 - j
    logits = k[:, :, None] - gap[..., None] * w  # (b, c, C(t), C(j), d)
    diag = torch.eye(C, dtype=torch.bool, device=k.device)
    logits = torch.where(diag[..., None], (u + k)[:, :, :, None], logits)
    logits = logits.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=k.device).tril()[..., None], float("-inf"))
    from_state = p_in[:, :, None] - steps[:, None] * w  # (b, c, C, d)
    top = torch.maximum(logits.amax(3), from_state)  # (b, c, C, d)
    weights = (logits - top[:, :, :, None]).exp()
    scale = (from_state - top).exp()
    num = (weights * v[:, :, None]).sum(3) + scale * a_in[:, :, None]
    den_t = weights.sum(3) + scale * b_in[:, :, None]
    y = (num / den_t).reshape(bsz, c * C, d)[:, :n]
    return y, (a, den, p)


# --------------------------------------------------------------------------- decoding state


class RWKV4State(RecurrentState):
    """One RWKV-4 layer's decoding state: the token shift's last input (b, d) and the WKV
    state (a, b, p), each (b, d) in fp32. Constant size."""

    def __init__(self, shift: ShiftState, dim: int) -> None:
        super().__init__(shift)
        b, dev = shift.batch, shift.device
        self.register_buffer("num", torch.zeros(b, dim, device=dev), persistent=False)
        self.register_buffer("den", torch.zeros(b, dim, device=dev), persistent=False)
        self.register_buffer("top", torch.full((b, dim), EMPTY, device=dev), persistent=False)

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.num, self.den, self.top

    def store(self, state: tuple[Tensor, Tensor, Tensor]) -> None:
        for buf, t in zip((self.num, self.den, self.top), state):
            buf.copy_(t)

    def reorder(self, index: Tensor) -> None:
        self.shift.reorder(index)
        self.num, self.den, self.top = (t.index_select(0, index) for t in (self.num, self.den, self.top))


# --------------------------------------------------------------------------- module


class RWKV4TimeMix(nn.Module):
    """RWKV-4 time mixing for a causal stack; its own decoding state (`make_cache`).

    Args:
        dim: model width d (the WKV runs per channel).
        layer_index, num_layers: the layer's place (the initialisation depends on depth).
        chunk_size: chunk length of the parallel form.
    """

    bench_mode = "module"

    def __init__(self, dim: int, *, layer_index: int, num_layers: int, chunk_size: int) -> None:
        super().__init__()
        self.dim, self.layer_index, self.num_layers, self.chunk_size = dim, layer_index, num_layers, chunk_size
        self.time_decay = nn.Parameter(torch.zeros(dim))
        self.time_first = nn.Parameter(torch.zeros(dim))
        self.time_mix_key = nn.Parameter(torch.ones(dim))
        self.time_mix_value = nn.Parameter(torch.ones(dim))
        self.time_mix_receptance = nn.Parameter(torch.ones(dim))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)

    def reset_extra_parameters(self) -> None:
        """The RWKV-4 reference's initialisation: decay speeds from -5 to 3 over the channels
        (steeper in deeper layers), bonus log(0.3) with a zigzag, depth-graded mixes, a zero
        output projection."""
        d = self.dim
        r01, r10 = layer_ratios(self.layer_index, self.num_layers)
        h = torch.arange(d, dtype=torch.float32)
        ddd = h / d
        with torch.no_grad():
            self.time_decay.copy_(-5 + 8 * (h / max(1, d - 1)) ** (0.7 + 1.3 * r01))
            zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(d)], dtype=torch.float32) * 0.5
            self.time_first.copy_(math.log(0.3) + zigzag)
            self.time_mix_key.copy_(ddd.pow(r10))
            self.time_mix_value.copy_(ddd.pow(r10) + 0.3 * r01)
            self.time_mix_receptance.copy_(ddd.pow(0.5 * r10))
            self.output.weight.zero_()

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Per token: no matrix products; about 8 elementwise operations per (token, channel)
        pair of a chunk (exponent, maximum, exponential, two products, two sums), C per token."""
        C = max(1, min(self.chunk_size, queries))
        return 8.0 * C * self.dim

    def step_flops(self, cached: int) -> float:
        """One decoding step: constant work, whatever the number of tokens seen."""
        return self.mixing_flops(1, cached + 1, causal=True)

    def make_cache(self, spec: CacheSpec) -> RWKV4State:
        """The constant-size decoding state (the shift in the model's dtype, the WKV in fp32)."""
        return RWKV4State(shift_cache(spec, self.dim, "attention kind 'rwkv4'"), self.dim)

    def forward(self, x: Tensor, ctx: AttentionContext, *, memory: Tensor | None = None, cache: RWKV4State | None = None) -> Tensor:
        """x: (b, n, d) -> (b, n, d); `cache` is this layer's recurrent state."""
        if memory is not None or not ctx.causal:
            raise ValueError("attention kind 'rwkv4' is a causal recurrence (decoder self-attention only); "
                             "encoders and cross-attention use an attention kind such as 'mha'")
        n = x.shape[1]
        keep = left_padding_keep(ctx.mask, n, "attention kind 'rwkv4'")
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        prev = token_shift(x, None if cache is None else cache.shift.previous())
        k = self.key(torch.lerp(prev, x, self.time_mix_key.to(x.dtype))).float()
        v = self.value(torch.lerp(prev, x, self.time_mix_value.to(x.dtype))).float()
        r = torch.sigmoid(self.receptance(torch.lerp(prev, x, self.time_mix_receptance.to(x.dtype))))
        if keep is not None:  # padded tokens add nothing to the state
            k = torch.where(keep[..., None].bool(), k, torch.full_like(k, EMPTY))
        state = None if cache is None else cache.state()
        y, new_state = wkv4_chunked(self.time_decay.float().exp(), self.time_first.float(), k, v, state, chunk_size=self.chunk_size)
        if cache is not None:
            cache.store(new_state)
            cache.shift.store(x)
        return self.output(r * y.to(r.dtype))


# --------------------------------------------------------------------------- registration


@dataclass
class RWKV4Options:
    """Options of attention kind 'rwkv4'. chunk_size: tokens per chunk of the parallel form
    (memory grows as chunk_size x tokens x width)."""

    chunk_size: int = 16


@ATTENTIONS.register("rwkv4")
def build_rwkv4(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """RWKV-4 time mixing (Peng et al. 2023)."""
    opts = parse_options(RWKV4Options, cfg.options, "model.attention.options (rwkv4)")
    check_rwkv_config(cfg, ctx, "rwkv4")
    if not 1 <= opts.chunk_size <= 256:
        raise ConfigError(f"model.attention.options.chunk_size must be 1-256 for rwkv4, got {opts.chunk_size}")
    return RWKV4TimeMix(ctx.dim, layer_index=ctx.layer_index, num_layers=ctx.num_layers, chunk_size=opts.chunk_size)


build_rwkv4.causal_only = True  # type: ignore[attr-defined]  # refuses non-causal stacks
build_rwkv4.one_value_head_per_query_head = True  # type: ignore[attr-defined]
build_rwkv4.orders_itself = True  # type: ignore[attr-defined]  # no logits: refuses positional kinds that act on them
