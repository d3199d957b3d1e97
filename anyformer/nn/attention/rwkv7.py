"""RWKV-7 time mixing (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution"): a matrix-valued state per head, evolved by the generalized delta rule with a
data-dependent decay, read by a receptance.

Legend: `b` batch, `h` heads, `n` tokens, `N` head size, `d` = h N model width, `B` = b h,
`c` chunks, `C` chunk size, `D` a low-rank (LoRA) width.

Per head, with the state S (N values x N keys) and, at token t, receptance r, log-decay
u = log w (negative), key k, value v, and the in-context learning rate's two vectors
a = -kk, bb = kk * alpha (kk the normalised "removal key"):

    S_t = S_{t-1} (diag(w_t) + a_t bb_t^T) + v_t k_t^T        y_t = S_t r_t

Two forms of the same recurrence:

- `rwkv7_recurrent`: one token at a time (decoding, and the reference in tests).
- `rwkv7_chunked`: chunks of C tokens. Inside a chunk everything is matrix products over the
  chunk, with the cumulative log-decay g_t = sum_{s<=t} u_s folded into the vectors
  (a~_s = a_s e^{g_{s-1}}, bb~_j = bb_j e^{-g_j}, k~_j = k_j e^{-g_j}, r~_t = r_t e^{g_t}).
  The low-rank reads U_s = S_{s-1} a_s solve a unit lower-triangular system
  (I - tril_-1(a~ bb~^T)) U = a~ S_0^T + tril_-1(a~ k~^T) V, so every chunk's outputs and its
  state update are affine in the state entering it: S_out = S_in A_c + E_c and
  Y = Q_c S_in^T + Y_c. A loop over chunks (not tokens) carries the state; the rest is batched
  over all chunks. Linear in n; autograd differentiates it as written. The decay of one
  RWKV-7 step is at least exp(-e^{-1/2}), so the factors e^{-g} stay below e^{0.61 C}: chunks
  are at most 64 tokens, which keeps them far inside fp32's range.

The layer around it (official parameter names, so checkpoints map one to one): token shift
with six mixes (x_r, x_w, x_k, x_v, x_a, x_g), receptance/key/value/output projections, LoRAs
for the decay (w0, w1, w2), the learning rate (a0, a1, a2), the value residual to the first
layer's values (v0, v1, v2; layers after the first) and the output gate (g1, g2), k_k, k_a,
r_k, and a per-head GroupNorm (ln_x). The first layer hands its values to the later ones
through the context (`ctx.carry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..kv_cache import CacheSpec
from ..positional.base import POSITIONALS, PositionalEncoding
from .context import AttentionContext
from .registry import ATTENTIONS
from .rwkv_channel import RecurrentState, ShiftState, layer_ratios, left_padding_keep, shift_cache, token_shift

DECAY_SCALE = math.exp(-0.5)  # the log-decay is -e^{-1/2} sigmoid(.), in (-0.607, 0)
MAX_CHUNK = 64


# --------------------------------------------------------------------------- pure math


def rwkv7_recurrent(
    r: Tensor, u: Tensor, k: Tensor, v: Tensor, a: Tensor, bb: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recurrence one token at a time. r, u (log-decay), k, v, a, bb: (b, h, n, N);
    state (b, h, N, N) values x keys, or None (zero). Returns y (b, h, n, N) and the last state."""
    b, h, n, N = r.shape
    S = r.new_zeros(b, h, N, N) if state is None else state
    ys = []
    for t in range(n):
        Sa = S @ a[:, :, t, :, None]  # (b, h, N, 1)
        S = S * u[:, :, t, None, :].exp() + Sa * bb[:, :, t, None, :] + v[:, :, t, :, None] * k[:, :, t, None, :]
        ys.append((S @ r[:, :, t, :, None])[..., 0])
    return torch.stack(ys, 2), S


def rwkv7_chunked(
    r: Tensor, u: Tensor, k: Tensor, v: Tensor, a: Tensor, bb: Tensor, state: Tensor | None = None, *, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The same recurrence in chunks of `chunk_size` (<= 64) tokens; same shapes as
    `rwkv7_recurrent`. Tokens are padded to whole chunks with inputs that change nothing."""
    b, h, n, N = r.shape
    C = max(1, min(chunk_size, n))
    pad = (-n) % C
    if pad:  # zero log-decay, key, value, a, bb: the state passes through unchanged
        r, u, k, v, a, bb = (F.pad(t, (0, 0, 0, pad)) for t in (r, u, k, v, a, bb))
    c = (n + pad) // C
    B = b * h
    r, u, k, v, a, bb = (t.reshape(B, c, C, N) for t in (r, u, k, v, a, bb))  # (B, c, C, N)
    g = u.cumsum(2)  # (B, c, C, N) cumulative log-decay through each token of its chunk
    a_t = a * (g - u).exp()  # decayed to the token before
    b_t, k_t = bb * (-g).exp(), k * (-g).exp()
    r_t = r * g.exp()
    strict = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=r.device).tril()
    m_ab = (a_t @ b_t.transpose(-1, -2)).masked_fill(~strict, 0.0)  # (B, c, C, C)
    m_ak = (a_t @ k_t.transpose(-1, -2)).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=r.dtype, device=r.device)
    # U = W S_in^T + Z: one unit-triangular solve for both right-hand sides
    wz = torch.linalg.solve_triangular(eye - m_ab, torch.cat([a_t, m_ak @ v], -1), upper=False, unitriangular=True)
    W, Z = wz[..., :N], wz[..., N:]  # (B, c, C, N) each
    l_rb = (r_t @ b_t.transpose(-1, -2)).masked_fill(~incl, 0.0)  # (B, c, C, C)
    l_rk = (r_t @ k_t.transpose(-1, -2)).masked_fill(~incl, 0.0)
    Q = r_t + l_rb @ W  # (B, c, C, N): reads the entering state
    Y = l_rb @ Z + l_rk @ v  # (B, c, C, N): the chunk's own contribution
    to_end = (g[:, :, -1:] - g).exp()  # (B, c, C, N) decay from each token to the chunk's end
    b_end, k_end = bb * to_end, k * to_end
    A = torch.diag_embed(g[:, :, -1].exp()) + W.transpose(-1, -2) @ b_end  # (B, c, N, N) keys x keys
    E = Z.transpose(-1, -2) @ b_end + v.transpose(-1, -2) @ k_end  # (B, c, N, N) values x keys
    S = r.new_zeros(B, N, N) if state is None else state.reshape(B, N, N)
    entering = []
    for A_i, E_i in zip(A.unbind(1), E.unbind(1)):  # unbind: one gradient stack, not a full-size zero per chunk
        entering.append(S)
        S = torch.baddbmm(E_i, S, A_i)
    S_in = torch.stack(entering, 1)  # (B, c, N, N)
    out = Y + Q @ S_in.transpose(-1, -2)  # (B, c, C, N)
    return out.reshape(b, h, c * C, N)[:, :, :n], S.view(b, h, N, N)


# --------------------------------------------------------------------------- decoding state


class RWKV7State(RecurrentState):
    """One RWKV-7 layer's decoding state: the token shift's last input (b, d) and the matrix
    state S (b, h, N, N) in fp32. Constant size, whatever the number of tokens seen."""

    def __init__(self, shift: ShiftState, num_heads: int, head_size: int) -> None:
        super().__init__(shift)
        self.register_buffer("S", torch.zeros(shift.batch, num_heads, head_size, head_size, device=shift.device), persistent=False)

    def state(self) -> Tensor | None:
        return self.S if self.shift.length else None

    def reorder(self, index: Tensor) -> None:
        self.shift.reorder(index)
        self.S = self.S.index_select(0, index)


# --------------------------------------------------------------------------- module


def _lora(dim: int, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(torch.zeros(dim, rank)), nn.Parameter(torch.zeros(rank, dim))


class RWKV7TimeMix(nn.Module):
    """RWKV-7 time mixing for a causal stack; its own decoding state (`make_cache`).

    Args:
        dim: model width d = num_heads * head_size.
        num_heads: heads (each with an N x N state).
        layer_index, num_layers: the layer's place (the first layer hands its values on;
            the initialisation depends on depth).
        decay_rank, rate_rank, value_rank, gate_rank: widths of the four LoRAs.
        chunk_size: chunk length of the parallel form (1-64).
    """

    bench_mode = "module"

    def __init__(
        self, dim: int, num_heads: int, *, layer_index: int, num_layers: int, decay_rank: int, rate_rank: int, value_rank: int,
        gate_rank: int, chunk_size: int,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.layer_index, self.num_layers, self.chunk_size = layer_index, num_layers, chunk_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(dim)))
        self.w1, self.w2 = _lora(dim, decay_rank)
        self.a1, self.a2 = _lora(dim, rate_rank)
        if layer_index > 0:
            self.v0 = nn.Parameter(torch.ones(dim))
            self.v1, self.v2 = _lora(dim, value_rank)
        self.g1, self.g2 = _lora(dim, gate_rank)
        self.r_k = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.ln_x = nn.GroupNorm(num_heads, dim, eps=64e-5)

    def reset_extra_parameters(self) -> None:
        """The RWKV-7 reference's initialisation (its training code): depth-graded shift mixes,
        decay speeds spread over channels, LoRAs with a zero first factor and an orthogonal
        second one scaled by 0.1, uniform projections, a zero output projection."""
        d, L = self.dim, self.num_layers
        r01, r10 = layer_ratios(self.layer_index, L)
        ddd = torch.arange(d, dtype=torch.float32) / d
        with torch.no_grad():
            for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(self, name).copy_(1.0 - ddd.pow(p * r10))
            spread = torch.arange(d, dtype=torch.float32) / max(1, d - 1)
            self.w0.copy_(-7.0 + 5.0 * spread.pow(0.85 + 1.0 * r01**0.5) + 0.5)
            self.a0.zero_()
            self.k_k.fill_(0.85)
            self.k_a.fill_(1.0)
            self.r_k.zero_()
            for first, second in ((self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)) + (
                ((self.v1, self.v2),) if self.layer_index > 0 else ()
            ):
                first.zero_()
                nn.init.orthogonal_(second, gain=0.1)
            if self.layer_index > 0:
                self.v0.fill_(1.0)
            bound = 1.0 / d**0.5
            self.receptance.weight.uniform_(-0.5 * bound, 0.5 * bound)
            self.key.weight.uniform_(-0.05 * bound, 0.05 * bound)
            self.value.weight.uniform_(-0.5 * bound, 0.5 * bound)
            self.output.weight.zero_()
            self.ln_x.weight.fill_(((1 + self.layer_index) / L) ** 0.7)
            self.ln_x.bias.zero_()

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Per token, independent of the length. The chunked form (C tokens a chunk, N the head
        size) per head: 16 C N for the in-chunk products, 2 C N for the triangular solve,
        8 N^2 for the chunk's state transition and the read of the entering state, 2 N^3 / C
        for carrying the state across chunks. One token (decoding): the low-rank read and the
        receptance read, 4 N^2 (the decay and the rank-one updates are elementwise)."""
        N = self.head_dim
        if queries <= 1:
            return 4.0 * self.num_heads * N**2
        C = min(self.chunk_size, queries)
        return self.num_heads * (18.0 * C * N + 8.0 * N**2 + 2.0 * N**3 / C)

    def step_flops(self, cached: int) -> float:
        """One decoding step: the same constant work, whatever the number of tokens seen."""
        return self.mixing_flops(1, cached + 1, causal=True)

    def make_cache(self, spec: CacheSpec) -> RWKV7State:
        """The constant-size decoding state (the shift in the model's dtype, S in fp32)."""
        return RWKV7State(shift_cache(spec, self.dim, "attention kind 'rwkv7'"), self.num_heads, self.head_dim)

    def forward(self, x: Tensor, ctx: AttentionContext, *, memory: Tensor | None = None, cache: RWKV7State | None = None) -> Tensor:
        """x: (b, n, d) -> (b, n, d); `cache` is this layer's recurrent state."""
        if memory is not None or not ctx.causal:
            raise ValueError("attention kind 'rwkv7' is a causal recurrence (decoder self-attention only); "
                             "encoders and cross-attention use an attention kind such as 'mha'")
        b, n, d = x.shape
        h, N = self.num_heads, self.head_dim
        keep = left_padding_keep(ctx.mask, n, "attention kind 'rwkv7'")
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        xx = token_shift(x, None if cache is None else cache.shift.previous()) - x  # (b, n, d)
        xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, name) for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        gate = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(b, n, h, N), dim=-1).view(b, n, d)
        k = k * (1 + (alpha - 1) * self.k_a)
        if self.layer_index == 0:
            ctx.carry["rwkv7.v_first"] = v
        else:
            v_first = ctx.carry.get("rwkv7.v_first")
            if v_first is None:
                raise ValueError("an rwkv7 layer after the first needs the first layer's values; the stack's first layer "
                                 "must be an rwkv7 layer too")
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        u = -DECAY_SCALE * torch.sigmoid(w.float())  # (b, n, d) log-decay
        a_vec, b_vec = -kk, kk * alpha
        if keep is not None:  # padded tokens leave the state as it is
            kf = keep[..., None]
            u, k_s, a_vec, b_vec = u * kf, k * kf.to(k.dtype), a_vec * kf.to(k.dtype), b_vec * kf.to(k.dtype)
        else:
            k_s = k

        def heads(t: Tensor) -> Tensor:
            return t.float().view(b, n, h, N).transpose(1, 2)  # (b, h, n, N)

        state = None if cache is None else cache.state()
        args = (heads(r), u.view(b, n, h, N).transpose(1, 2), heads(k_s), heads(v), heads(a_vec), heads(b_vec), state)
        y, S = rwkv7_recurrent(*args) if n == 1 else rwkv7_chunked(*args, chunk_size=self.chunk_size)
        if cache is not None:
            cache.S.copy_(S)
            cache.shift.store(x)
        y = y.transpose(1, 2).reshape(b * n, d)  # (b n, d)
        y = self.ln_x(y).view(b, n, d).to(x.dtype)
        bonus = (r * k * self.r_k.view(d)).view(b, n, h, N).sum(-1, keepdim=True) * v.view(b, n, h, N)  # (b, n, h, N)
        return self.output((y + bonus.view(b, n, d)) * gate)


# --------------------------------------------------------------------------- registration


@dataclass
class RWKV7Options:
    """Options of attention kind 'rwkv7'.

    chunk_size: tokens per chunk of the parallel form (1-64).
    decay_rank, rate_rank, value_rank, gate_rank: LoRA widths of the decay, the in-context
        learning rate, the value residual and the output gate (None: the reference's sizes for
        the width, multiples of 32 growing with sqrt(d), and 0.6 d^0.8 for the gate).
    """

    chunk_size: int = 32
    decay_rank: int | None = None
    rate_rank: int | None = None
    value_rank: int | None = None
    gate_rank: int | None = None


def default_ranks(dim: int) -> dict[str, int]:
    """The reference's LoRA widths for width `dim`."""

    def mult32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    return {"decay_rank": mult32(1.8 * dim**0.5), "rate_rank": mult32(1.8 * dim**0.5),
            "value_rank": mult32(1.3 * dim**0.5), "gate_rank": mult32(0.6 * dim**0.8)}


def check_rwkv_config(cfg: AttentionConfig, ctx: BuildContext, kind: str) -> None:
    """Refuse, with a ConfigError, the settings an RWKV layer cannot honour."""
    if ctx.cross or not ctx.causal:
        where = "cross-attention" if ctx.cross else f"the '{ctx.stack}' stack, which is not causal"
        raise ConfigError(f"attention kind '{kind}' is a causal recurrence (decoder self-attention only); it cannot be "
                          f"{where}. Use an attention kind such as 'mha' there")
    dim = ctx.dim
    positional = ctx.model.positional.kind
    pos_cls = POSITIONALS.get(positional)
    hooks = ("rotate", "bias", "query_bias", "value_term")
    if any(getattr(pos_cls, name) is not getattr(PositionalEncoding, name) for name in hooks):
        raise ConfigError(f"attention kind '{kind}' has no query-key logits for positional kind '{positional}' to act on "
                          "(it would be ignored); a recurrence knows the order of its tokens. Use model.positional.kind=none "
                          "(as RWKV does) or an encoding added to the embeddings (learned, sinusoidal)")
    head = cfg.head_dim or dim // cfg.num_heads
    if head * cfg.num_heads != dim:
        raise ConfigError(f"attention kind '{kind}' splits the width into heads: num_heads ({cfg.num_heads}) x head_dim "
                          f"({head}) must equal model.dim ({dim})")
    unsupported = [name for name, value, default in (  # grouped key/value heads: there are no keys to share
        ("num_kv_heads", cfg.num_kv_heads in (None, cfg.num_heads), True), ("bias", cfg.bias, False), ("out_bias", cfg.out_bias, None),
        ("qk_norm", cfg.qk_norm, "none"), ("scale", cfg.scale, None), ("dropout", cfg.dropout, 0.0)) if value != default]
    if unsupported:
        raise ConfigError(f"attention kind '{kind}' has no {', '.join(unsupported)}; leave model.attention."
                          f"{{{','.join(unsupported)}}} at their defaults")


@ATTENTIONS.register("rwkv7")
def build_rwkv7(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """RWKV-7 time mixing (Peng et al. 2025)."""
    opts = parse_options(RWKV7Options, cfg.options, "model.attention.options (rwkv7)")
    check_rwkv_config(cfg, ctx, "rwkv7")
    if not 1 <= opts.chunk_size <= MAX_CHUNK:
        raise ConfigError(f"model.attention.options.chunk_size must be 1-{MAX_CHUNK} for rwkv7 (its in-chunk decay factors "
                          f"grow as exp(0.61 x chunk)), got {opts.chunk_size}")
    ranks = default_ranks(ctx.dim)
    for name in ranks:
        given = getattr(opts, name)
        if given is not None:
            if given < 1:
                raise ConfigError(f"model.attention.options.{name} must be >= 1, got {given}")
            ranks[name] = given
    return RWKV7TimeMix(ctx.dim, cfg.num_heads, layer_index=ctx.layer_index, num_layers=ctx.num_layers,
                        chunk_size=opts.chunk_size, **ranks)


build_rwkv7.causal_only = True  # type: ignore[attr-defined]  # refuses non-causal stacks
build_rwkv7.one_value_head_per_query_head = True  # type: ignore[attr-defined]
build_rwkv7.orders_itself = True  # type: ignore[attr-defined]  # no logits: refuses positional kinds that act on them
