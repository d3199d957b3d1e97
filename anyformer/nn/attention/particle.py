"""Tokens as interacting particles (Geshkovski, Letrouit, Polyanskiy & Rigollet, "A mathematical
perspective on Transformers", 2023): attention with Q = K = V = I on tokens that live on a
sphere, so that a stack of such layers is a discretised flow whose clusters can be watched.

Legend: `b` batch, `h` heads (the paper: 1), `n` queries, `m` keys, `d` width per head.

The paper's dynamics, for tokens x_i on the unit sphere S^{d-1} and inverse temperature beta:

    SA:   dx_i/dt = P_{x_i}( (1/Z_i) sum_j exp(beta <x_i, x_j>) x_j ),  Z_i = sum_j exp(beta <x_i, x_j>)
    USA:  dx_i/dt = P_{x_i}( (1/n)   sum_j exp(beta <x_i, x_j>) x_j )   (unnormalized: the gradient
          ascent of the energy E = 1/(2 beta n^2) sum_ij exp(beta <x_i, x_j>) on the sphere)

P_x projects onto the tangent space at x. Here the tokens live on the sphere of radius sqrt(d)
that RMSNorm (weight 1) projects onto, and the logits are beta <x_i, x_j> / d = beta cos(x_i, x_j):
the same flow, scaled by sqrt(d). One layer is one explicit step of size `step` and the
projection back: x <- norm(x + step * A(x)), the residual connection with post-normalisation.
`value: -1` (V = -I) reverses the interaction: the tokens repel.

Two parts, each usable alone:
- attention kind `particle` (options beta, normalization softmax | usa, value +1 | -1, step);
- feed-forward kind `none`: no feed-forward (an attention-only block).
A model of the paper's dynamics: arch encoder, attention particle, norm rmsnorm with placement
post (eps 1e-12), embed_norm true, ffn none, positional none, no final norm
(configs/theory/particles.yaml); `depth.kind: looped` runs one layer for as many steps as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, FeedForwardConfig, parse_options
from ..build_context import BuildContext
from ..feedforward import FEEDFORWARDS, FeedForward
from .context import AttentionContext
from .kernels import attention_logits, full_mask
from .mha import MultiHeadAttention
from .registry import ATTENTIONS, KERNELS


@dataclass
class ParticleOptions:
    """beta: inverse temperature (the logit scale); normalization: softmax (SA, each query's
    weights sum to 1) or usa (exp(beta <x_i, x_j>) / n); value: +1 (V = I, attraction) or -1
    (V = -I, repulsion); step: the step size of one layer."""

    beta: float = 1.0
    normalization: Literal["softmax", "usa"] = "softmax"
    value: Literal[1, -1] = 1
    step: float = 0.1


class ParticleAttention(MultiHeadAttention):
    """Self-attention with identity projections (Q = K = V = I), logits beta <x_i, x_j> / d,
    output scaled by value * step (the SA dynamics). The paper's model has one head of the full
    width; with h heads each reads its own d/h coordinates."""

    def __init__(self, dim: int, *, num_heads: int, beta: float, coefficient: float, kernel: object) -> None:
        ident = nn.Identity
        super().__init__(q_proj=ident(), k_proj=ident(), v_proj=ident(), o_proj=ident(), num_heads=num_heads,
                         head_dim=dim // num_heads, kernel=kernel, scale=beta / (dim // num_heads))  # type: ignore[arg-type]
        self.coefficient = coefficient

    def transform_heads(self, out: Tensor, ctx: AttentionContext) -> Tensor:  # (b, h, n, d)
        return out * self.coefficient


class UnnormalizedParticleAttention(ParticleAttention):
    """The USA dynamics: weights exp(beta <x_i, x_j> / d) / (number of keys), not normalised
    per query (fp32; beta above ~80 overflows it for tokens on the sphere)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:  # q (b, h, n, d), k, v (b, h, m, d)
        n, m = q.shape[2], k.shape[2]
        mask = full_mask(ctx.mask, ctx.causal, n, m, q.device)
        weights = torch.exp(attention_logits(q, k, bias=self.logit_bias(q, ctx), scale=self.scale))  # (b, h, n, m) fp32
        if mask is None:
            weights = weights / m
        else:
            weights = weights.masked_fill(~mask, 0.0) / mask.sum(-1, keepdim=True).clamp_min(1)
        if ctx.store is not None:
            ctx.store.append(weights)
        return weights.to(v.dtype) @ v


@ATTENTIONS.register("particle", options=ParticleOptions)
def build_particle(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Attention of the interacting-particle dynamics (Geshkovski et al. 2023)."""
    o = parse_options(ParticleOptions, cfg.options, "model.attention.options (particle)")
    if ctx.cross:
        raise ConfigError("attention kind 'particle' is self-attention of tokens on the sphere; it has no cross-attention form")
    if not (o.beta > 0 and o.step > 0):
        raise ConfigError(f"model.attention.options.beta and step must be positive, got {o.beta} and {o.step}")
    if ctx.dim % cfg.num_heads or (cfg.head_dim not in (None, ctx.dim // cfg.num_heads)):
        raise ConfigError(f"attention kind 'particle' splits the width into its heads (Q = K = V = I): model.dim={ctx.dim} must be "
                          f"divisible by model.attention.num_heads={cfg.num_heads}, and head_dim left unset")
    cls = ParticleAttention if o.normalization == "softmax" else UnnormalizedParticleAttention
    return cls(ctx.dim, num_heads=cfg.num_heads, beta=o.beta, coefficient=o.value * o.step, kernel=KERNELS.get(cfg.kernel))


@FEEDFORWARDS.register("none")
class NoFeedForward(FeedForward):
    """No feed-forward: the block is attention only (its residual branch adds zero)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 0)

    @classmethod
    def build(cls, cfg: FeedForwardConfig, ctx: BuildContext) -> "FeedForward":
        default = FeedForwardConfig(kind="none")
        given = [name for name in ("activation", "hidden_mult", "hidden_dim", "multiple_of", "bias", "dropout")
                 if getattr(cfg, name) != getattr(default, name)]
        if given:
            raise ConfigError(f"feed-forward kind 'none' has no layers; leave model.ffn.{', '.join(given)} unset")
        return cls(ctx.dim)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, d) -> (b, n, d) zeros
        return torch.zeros_like(x)
