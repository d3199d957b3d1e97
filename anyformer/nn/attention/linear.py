"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") and the machinery
every kernelized attention shares: bidirectional, chunked causal and recurrent forms, a
constant-size decoding state, and a quadratic form for logit biases and arbitrary masks.

A kernelized attention replaces softmax(q k^T) by feature maps phi(q) phi(k)^T, so that

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)

costs O(n f e) time and O(f e) state instead of O(n^2). The numerator and the normaliser may
use different features: with RoPE the numerator uses rotated features and the normaliser the
un-rotated ones (RoFormer, Su et al. 2021, eq. 19).

Legend: `b` batch, `h` query heads, `g` key/value heads, `n` length, `d` head dim, `f` feature
dim (numerator), `r` feature dim (normaliser), `e` value dim, `c` chunks, `C` chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..kv_cache import CacheSpec
from .context import AttentionContext
from .kernels import repeat_kv
from .masks import causal_mask, combine_masks
from .mha import head_dim_of, projections, qk_norms
from .registry import ATTENTIONS

# --------------------------------------------------------------------------- pure math


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020), elementwise."""
    return F.elu(x).add_(1.0)


def linear_attention(qn: Tensor, kn: Tensor, v: Tensor, qd: Tensor, kd: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Bidirectional linear attention in O(n): qn, kn (b, h, n, f); qd, kd (b, h, n, r); v (b, h, n, e)."""
    kv = kn.transpose(-1, -2) @ v  # (b, h, f, e)
    den = (qd * kd.sum(2, keepdim=True)).sum(-1, keepdim=True)  # (b, h, n, 1)
    return (qn @ kv) / (den + eps)


def causal_linear_attention(
    qn: Tensor,
    kn: Tensor,
    v: Tensor,
    qd: Tensor,
    kd: Tensor,
    *,
    chunk_size: int = 64,
    state: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention in chunks: quadratic inside each chunk, a running state between.

    qn, kn: (b, h, n, f); qd, kd: (b, h, n, r); v: (b, h, n, e). `state` = (kv (b, h, f, e),
    ksum (b, h, r)) summarises earlier tokens (None: nothing before). Returns the output
    (b, h, n, e) and the state after the last token.
    """
    b, h, n, f = qn.shape
    e = v.shape[-1]
    if state is None:
        kv0 = qn.new_zeros(b, h, f, e)
        ksum0 = qd.new_zeros(b, h, kd.shape[-1])
    else:
        kv0, ksum0 = state
    if n == 1:  # a decoding step: the token's key joins the state, then its query reads the state
        kv = kv0 + kn.transpose(-1, -2) @ v  # (b, h, f, e)
        ksum = ksum0 + kd[:, :, 0]  # (b, h, r)
        return (qn @ kv) / (qd @ ksum[..., None] + eps), (kv, ksum)
    # pad to whole chunks (zero keys add nothing; padded query rows are cut off at the end)
    C = max(1, min(chunk_size, n))
    pad = (-n) % C
    if pad:
        qn, kn, v, qd, kd = (F.pad(t, (0, 0, 0, pad)) for t in (qn, kn, v, qd, kd))
    c = (n + pad) // C
    r = kd.shape[-1]
    if qd is qn and kd is kn:
        out, new_state = _causal_shared_features(qn, kn, v, C, c, kv0, ksum0 if state is not None else None, eps)
        return out[:, :, :n], new_state
    qc, kc, vc = qn.view(b, h, c, C, f), kn.view(b, h, c, C, f), v.view(b, h, c, C, e)
    qdc, kdc = qd.view(b, h, c, C, r), kd.view(b, h, c, C, r)
    # what each chunk adds to the state, and the exclusive prefix over chunks as one product
    # with a strictly lower-triangular (c, c) matrix (faster on CPU than cumsum over c)
    chunk_kv = kc.transpose(-1, -2) @ vc  # (b, h, c, f, e)
    chunk_k = kdc.sum(3)  # (b, h, c, r)
    earlier = torch.ones(c, c, dtype=chunk_kv.dtype, device=qn.device).tril(-1)  # (c, c)
    kv_before = kv0[:, :, None] + (earlier @ chunk_kv.flatten(-2)).view(b, h, c, f, e)  # state entering each chunk
    k_before = ksum0[:, :, None] + earlier @ chunk_k  # (b, h, c, r)
    tril = torch.ones(C, C, dtype=torch.bool, device=qn.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (b, h, c, C, C)
    num = qc @ kv_before + scores @ vc  # (b, h, c, C, e)
    dscores = scores if qd is qn and kd is kn else (qdc @ kdc.transpose(-1, -2)).masked_fill(~tril, 0.0)
    den = (qdc @ k_before[..., None]) + dscores.sum(-1, keepdim=True)  # (b, h, c, C, 1)
    num = num.view(b, h, c * C, e)[:, :, :n]
    den = den.view(b, h, c * C, 1)[:, :, :n]
    new_state = (kv0 + chunk_kv.sum(2), ksum0 + chunk_k.sum(2))
    return num / (den + eps), new_state


def _causal_shared_features(
    qn: Tensor, kn: Tensor, v: Tensor, C: int, c: int, kv0: Tensor, ksum0: Tensor | None, eps: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The chunked causal form when the normaliser uses the same features as the numerator
    (qd = qn, kd = kn), as elu+1 linear attention does: v gets a column of ones, so one set of
    products yields numerator and normaliser together (the state's extra column is the running
    key sum). Inputs are already padded to c chunks of C; kv0 (b, h, f, e), ksum0 (b, h, f) or
    None. Three batched products over (b*h*c) chunks: chunk states, queries times the state
    entering their chunk, and the masked in-chunk scores times values (added in place)."""
    b, h, n, f = qn.shape
    e = v.shape[-1]
    v1 = torch.cat([v, v.new_ones(b, h, n, 1)], -1)  # (b, h, n, e+1)
    qc, kc = qn.reshape(b * h * c, C, f), kn.reshape(b * h * c, C, f)
    vc = v1.view(b * h * c, C, e + 1)
    chunk_kv = torch.bmm(kc.transpose(1, 2), vc).view(b * h, c, f * (e + 1))  # each chunk's addition to the state
    # exclusive prefix over chunks as one product with a strictly lower-triangular (c, c) matrix
    earlier = torch.ones(c, c, dtype=chunk_kv.dtype, device=qn.device).tril(-1)
    kv_before = torch.matmul(earlier, chunk_kv).view(b, h, c, f, e + 1)  # state entering each chunk
    state0 = None
    if ksum0 is not None:
        state0 = torch.cat([kv0, ksum0[..., None]], -1)  # (b, h, f, e+1)
        kv_before = kv_before + state0[:, :, None]
    tril = torch.ones(C, C, dtype=torch.bool, device=qn.device).tril()
    scores = torch.bmm(qc, kc.transpose(1, 2)).masked_fill_(~tril, 0.0)  # (b*h*c, C, C)
    out = torch.baddbmm(torch.bmm(qc, kv_before.view(b * h * c, f, e + 1)), scores, vc).view(b, h, n, e + 1)
    total = chunk_kv.view(b, h, c, f, e + 1).sum(2)
    if state0 is not None:
        total = total + state0
    return out[..., :e] / (out[..., e:] + eps), (total[..., :e], total[..., e])


def recurrent_linear_attention(
    qn: Tensor, kn: Tensor, v: Tensor, qd: Tensor, kd: Tensor, *, state: tuple[Tensor, Tensor] | None = None, eps: float = 1e-6
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The RNN form: one token at a time, S += phi(k) v^T, z += phi(k). Same shapes as
    `causal_linear_attention`; O(f e) memory whatever the length."""
    b, h, n, f = qn.shape
    kv = qn.new_zeros(b, h, f, v.shape[-1]) if state is None else state[0]
    ksum = qd.new_zeros(b, h, kd.shape[-1]) if state is None else state[1]
    outs = []
    for t in range(n):
        kv = kv + kn[:, :, t, :, None] * v[:, :, t, None, :]  # (b, h, f, e)
        ksum = ksum + kd[:, :, t]  # (b, h, r)
        num = (qn[:, :, t, None, :] @ kv)[:, :, 0]  # (b, h, e)
        den = (qd[:, :, t] * ksum).sum(-1, keepdim=True)  # (b, h, 1)
        outs.append(num / (den + eps))
    return torch.stack(outs, dim=2), (kv, ksum)


def quadratic_linear_attention(
    qn: Tensor,
    kn: Tensor,
    v: Tensor,
    qd: Tensor,
    kd: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Kernelized attention written out as an (n, m) matrix, for what the linear forms cannot
    express: an arbitrary boolean `mask` (broadcastable to (b, h, n, m), True = attend) and an
    additive logit `bias`, which multiplies the kernel by exp(bias) as it would multiply
    exp(q k) in softmax attention. Returns the output (b, h, n, e) and the weights (b, h, n, m)."""
    num_w = qn @ kn.transpose(-1, -2)  # (b, h, n, m)
    den_w = qd @ kd.transpose(-1, -2)  # (b, h, n, m)
    if bias is not None:
        factor = bias.float().exp()
        num_w, den_w = num_w * factor, den_w * factor
    if mask is not None:
        num_w, den_w = num_w.masked_fill(~mask, 0.0), den_w.masked_fill(~mask, 0.0)
    weights = num_w / (den_w.sum(-1, keepdim=True) + eps)
    return weights @ v, weights


# --------------------------------------------------------------------------- decoding state


class LinearAttentionCache(nn.Module):
    """The constant-size decoding state of one kernelized attention layer.

    kv: (b, h, f, e) sum of phi(k) v^T; ksum: (b, h, r) sum of phi(k); shift: (b, h, 1, 1) a
    log-scale the key features were divided by (Performer's stabiliser; 0 for linear
    attention). Kept in fp32 whatever the model's dtype. `max_len` only bounds the positions
    the model cache records; the state itself does not grow.
    """

    def __init__(
        self, batch: int, num_heads: int, num_features: int, norm_features: int, value_dim: int, max_len: int, *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        f32 = torch.float32
        self.register_buffer("kv", torch.zeros(batch, num_heads, num_features, value_dim, dtype=f32, device=device), persistent=False)
        self.register_buffer("ksum", torch.zeros(batch, num_heads, norm_features, dtype=f32, device=device), persistent=False)
        self.register_buffer("shift", torch.full((batch, num_heads, 1, 1), float("-inf"), dtype=f32, device=device), persistent=False)
        self._max_len = max_len
        self.length = 0

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def batch(self) -> int:
        return self.kv.shape[0]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def state(self) -> tuple[Tensor, Tensor] | None:
        """(kv, ksum), or None before the first token."""
        return None if self.length == 0 else (self.kv, self.ksum)

    def rescale(self, new_shift: Tensor) -> None:
        """Move the state to a larger key-feature shift (b, h, 1, 1): multiply by exp(old - new)."""
        if self.length:
            factor = (self.shift - new_shift).exp()  # (b, h, 1, 1)
            self.kv.mul_(factor)
            self.ksum.mul_(factor[..., 0])
        self.shift.copy_(new_shift)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (b',) of the state, in that order (beam search)."""
        self.kv = self.kv.index_select(0, index)
        self.ksum = self.ksum.index_select(0, index)
        self.shift = self.shift.index_select(0, index)

    def store(self, state: tuple[Tensor, Tensor], n: int) -> None:
        """Keep the state after `n` more tokens."""
        self.kv.copy_(state[0])
        self.ksum.copy_(state[1])
        self.length += n


# --------------------------------------------------------------------------- module


class EluFeatures(nn.Module):
    """elu + 1 features; RoPE (if the model uses it) rotates the features of the numerator
    only, keeping the normaliser un-rotated and positive (RoFormer's linear attention)."""

    def num_features(self, head_dim: int) -> tuple[int, int]:
        """(numerator, normaliser) feature sizes for a head width."""
        return head_dim, head_dim

    def forward(
        self, q: Tensor, k: Tensor, ctx: AttentionContext, *, keep: Tensor | None, cache: LinearAttentionCache | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k (b, h, n, d) -> (phi_num(q), phi_num(k), phi_den(q), phi_den(k)); keep (b, 1, n, 1)."""
        qd, kd = elu_feature_map(q.float()), elu_feature_map(k.float())
        if keep is not None:
            kd = kd * keep
        qn, kn = ctx.positional.rotate(qd, kd, ctx.q_pos, ctx.q_pos)
        return qn, kn, qd, kd


class KernelizedAttention(nn.Module):
    """Multi-head attention with a feature map in place of the softmax (linear attention,
    Performer). Causal stacks run the chunked form, or the recurrent state with a cache.

    Args:
        q_proj, k_proj, v_proj, o_proj: the projections (injected, as in MultiHeadAttention;
            see `mha.projections`); num_heads / num_kv_heads / head_dim: as in MultiHeadAttention.
        features: the feature map module (EluFeatures, FavorFeatures, ...).
        chunk_size: chunk length of the causal form.
        eps: added to the normaliser.
        q_norm, k_norm: optional QK-norms.
    """

    def __init__(
        self,
        *,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        num_heads: int,
        head_dim: int,
        features: nn.Module,
        num_kv_heads: int | None = None,
        chunk_size: int,
        eps: float,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.features = features
        self.chunk_size = chunk_size
        self.eps = eps

    bench_mode = "kernel"  # `bench attention` times its feature maps and linear form on ready q, k, v

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Per query token, independent of the length: the feature maps of its query and key
        (`features.flops`), the key's outer product into the state and the query's read of it,
        numerator (f features) and normaliser (r)."""
        f, r = self.features.num_features(self.head_dim)
        feature_maps = getattr(self.features, "flops", lambda d: 0.0)(self.head_dim)
        return self.num_heads * (4.0 * f * self.head_dim + 4.0 * r + feature_maps)

    def step_flops(self, cached: int) -> float:
        """One decoding step, the same whatever the number of cached tokens: the feature maps
        of its query and key, the key's outer product into the state and the query's read of
        it (f x e each), the query's read of the normaliser (r)."""
        f, r = self.features.num_features(self.head_dim)
        feature_maps = getattr(self.features, "flops", lambda d: 0.0)(self.head_dim)
        return self.num_heads * (4.0 * f * self.head_dim + 2.0 * r + feature_maps)

    def make_cache(self, spec: CacheSpec) -> LinearAttentionCache:
        """A constant-size recurrent state for decoding (kept in fp32; the spec's dtype is not used)."""
        if spec.window is not None:
            raise ValueError(
                "kernelized attention decodes with a constant-size state and keeps every token in it; a rolling "
                "(sink + window) cache does not apply. Drop `window`, or use an exact or sparse attention kind"
            )
        f, r = self.features.num_features(self.head_dim)
        return LinearAttentionCache(spec.batch, self.num_heads, f, r, self.head_dim, spec.max_len, device=spec.device)

    def _heads(self, x: Tensor, proj: nn.Linear, heads: int) -> Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, heads, self.head_dim).transpose(1, 2)  # (b, heads, n, d)

    def forward(
        self, x: Tensor, ctx: AttentionContext, *, memory: Tensor | None = None, cache: LinearAttentionCache | None = None
    ) -> Tensor:
        """x: (b, n, dim) -> (b, n, dim); `cache` is this layer's recurrent state (causal only)."""
        if memory is not None:
            raise ValueError("kernelized attention is self-attention only; cross-attention uses kind 'mha'")
        b, n, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = self.q_norm(self._heads(x, self.q_proj, self.num_heads))  # (b, h, n, d)
        k = repeat_kv(self.k_norm(self._heads(x, self.k_proj, self.num_kv_heads)), groups)  # (b, h, n, d)
        v = repeat_kv(self._heads(x, self.v_proj, self.num_kv_heads), groups).float()  # (b, h, n, d)
        if ctx.positional.query_aware:
            raise ValueError(f"positional kind {type(ctx.positional).__name__} adds a term computed from the queries and each "
                             "key's position, which kernelized attention cannot fold into its linear form; use an exact kind")
        bias, keep = ctx.logit_bias(), _key_keep(ctx.mask, n)
        if bias is not None or ctx.store is not None or (ctx.mask is not None and keep is None):
            out = self._quadratic(q, k, v, ctx, bias, cache)
        elif ctx.causal:
            qn, kn, qd, kd = self.features(q, k, ctx, keep=keep, cache=cache)
            state = None if cache is None else cache.state()
            out, state = causal_linear_attention(qn, kn, v, qd, kd, chunk_size=self.chunk_size, state=state, eps=self.eps)
            if cache is not None:
                cache.store(state, n)
        else:
            if cache is not None:
                raise ValueError("a recurrent cache needs causal attention; bidirectional stacks run without one")
            qn, kn, qd, kd = self.features(q, k, ctx, keep=keep, cache=None)
            out = linear_attention(qn, kn, v, qd, kd, eps=self.eps)
        out = out.to(x.dtype).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # (b, n, h*d)
        return self.o_proj(out)

    def _quadratic(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, bias: Tensor | None, cache: LinearAttentionCache | None
    ) -> Tensor:
        if cache is not None:
            raise ValueError(
                "kernelized attention decodes with a constant-size state, which cannot apply a logit bias "
                "(alibi, t5), a general attention mask or return attention weights; use positional kind "
                "rope/sinusoidal/learned/none and a key-padding attention_mask, or attention kind 'mha'"
            )
        n = q.shape[2]
        qn, kn, qd, kd = self.features(q, k, ctx, keep=None, cache=None)
        mask = combine_masks(ctx.mask, causal_mask(n, n, q.device) if ctx.causal else None)
        out, weights = quadratic_linear_attention(qn, kn, v, qd, kd, mask=mask, bias=bias, eps=self.eps)
        if ctx.store is not None:
            ctx.store.append(weights)
        return out


def _key_keep(mask: Tensor | None, n: int) -> Tensor | None:
    """A key-padding mask (b, 1, 1, m) as (b, 1, n, 1) floats for the last n keys; None when
    there is no mask or the mask is more than key padding."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    return mask[:, 0, 0, -n:, None][:, None].float()  # (b, 1, n, 1)


# --------------------------------------------------------------------------- registration


@dataclass
class LinearOptions:
    """Options of attention kind 'linear'.

    chunk_size: chunk length of the causal form (quadratic work inside a chunk).
    eps: added to the normaliser.
    """

    chunk_size: int = 128  # fastest of 32-512 for 64-dim heads on CPU
    eps: float = 1e-6


def check_kernelized_config(cfg: AttentionConfig, kind: str, cross: bool) -> None:
    """Settings a kernelized attention cannot honour raise a ConfigError saying what to change."""
    if cross:
        raise ConfigError(f"attention kind '{kind}' is self-attention only; cross-attention uses 'mha'")
    if cfg.dropout:
        raise ConfigError(
            f"attention kind '{kind}' has no attention probabilities to drop out; set model.attention.dropout=0"
        )


def kernelized_from_config(
    cfg: AttentionConfig, dim: int, features: nn.Module, *, chunk_size: int, eps: float
) -> KernelizedAttention:
    """A KernelizedAttention with the config's heads, projections and q/k norms around a built
    feature map (shared by the 'linear' and 'performer' kinds)."""
    head_dim = head_dim_of(cfg, dim)
    num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    q_norm, k_norm = qk_norms(cfg, head_dim)
    projs = projections(dim, cfg.num_heads, num_kv_heads, head_dim, bias=cfg.bias, out_bias=cfg.out_bias)
    return KernelizedAttention(
        **projs,  # type: ignore[arg-type]
        num_heads=cfg.num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, features=features,
        chunk_size=chunk_size, eps=eps, q_norm=q_norm, k_norm=k_norm,
    )


@ATTENTIONS.register("linear")
def build_linear(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Linear attention with elu + 1 features (Katharopoulos et al. 2020)."""
    opts = parse_options(LinearOptions, cfg.options, "model.attention.options (linear)")
    check_kernelized_config(cfg, "linear", ctx.cross)
    if cfg.scale is not None:
        raise ConfigError("attention kind 'linear' has no logit scale; leave model.attention.scale unset")
    if opts.chunk_size < 1:
        raise ConfigError(f"model.attention.options.chunk_size must be >= 1, got {opts.chunk_size}")
    return kernelized_from_config(cfg, ctx.dim, EluFeatures(), chunk_size=opts.chunk_size, eps=opts.eps)
