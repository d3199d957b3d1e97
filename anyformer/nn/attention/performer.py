"""Performer: softmax attention through positive orthogonal random features, FAVOR+
(Choromanski et al. 2021, "Rethinking Attention with Performers").

    exp(x . y) = E_w[ phi(x) . phi(y) ],  phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  w ~ N(0, I)

with the m rows of W drawn in orthogonal blocks (lower variance). Queries and keys are scaled
by scale ** 0.5 first so that x . y is the softmax logit. Bidirectional, chunked causal and
recurrent forms come from the shared kernelized machinery in `linear.py`. RoPE rotates queries
and keys before the feature map, so the features approximate RoPE softmax attention.

Legend: `b` batch, `h` heads, `n` length, `d` head dim, `m` random features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from .registry import ATTENTIONS
from .context import AttentionContext
from .linear import LinearAttentionCache, check_kernelized_config, kernelized_from_config


def gaussian_orthogonal_matrix(
    num_features: int, dim: int, *, orthogonal: bool = True, device: torch.device | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """(m, d) random projection: rows ~ N(0, I_d), orthogonal within each block of d rows (their
    lengths redrawn from the chi distribution so each row is still marginally Gaussian)."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator).to(device)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))  # (d, d), orthonormal columns
        blocks.append(q.T)
    rows = torch.cat(blocks)[:num_features]  # (m, d), unit rows
    lengths = torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)  # (m, 1)
    return (rows * lengths).to(device)


def favor_logits(x: Tensor, projection: Tensor, scale: float) -> Tensor:
    """log of the unnormalised positive features: W x' - |x'|^2 / 2 with x' = x * scale ** 0.5.
    x (b, h, n, d), projection (m, d) -> (b, h, n, m), in fp32."""
    x = x.float() * scale**0.5
    return x @ projection.float().T - 0.5 * x.square().sum(-1, keepdim=True)


def favor_query_features(q: Tensor, projection: Tensor, scale: float) -> Tensor:
    """Query features (b, h, n, m), each row divided by its max (a per-query constant, which
    cancels between numerator and normaliser)."""
    a = favor_logits(q, projection, scale)
    return (a - a.amax(-1, keepdim=True)).exp() / math.sqrt(projection.shape[0])


def favor_key_features(k: Tensor, projection: Tensor, scale: float, shift: Tensor) -> Tensor:
    """Key features (b, h, n, m) divided by exp(shift), shift (b, h, 1, 1) a per-head constant."""
    return (favor_logits(k, projection, scale) - shift).exp() / math.sqrt(projection.shape[0])


class FavorFeatures(nn.Module):
    """FAVOR+ positive random features with an optional periodic redraw.

    Args:
        head_dim: d; num_features: m; orthogonal: draw W in orthogonal blocks;
        redraw_interval: draw a new W every this many training forward passes (0: never);
        scale: the softmax logit scale (default d ** -0.5).

    The drawn W is a persistent buffer, so a checkpoint reproduces the model exactly.
    """

    approximates_softmax = True  # benchmarks print its error against exact attention

    def __init__(self, head_dim: int, num_features: int, *, orthogonal: bool, redraw_interval: int, scale: float | None) -> None:
        super().__init__()
        self.head_dim, self.m, self.orthogonal = head_dim, num_features, orthogonal
        self.redraw_interval = redraw_interval
        self.scale = head_dim**-0.5 if scale is None else scale
        self.register_buffer("projection", gaussian_orthogonal_matrix(num_features, head_dim, orthogonal=orthogonal))
        self.training_calls = 0

    def num_features(self, head_dim: int) -> tuple[int, int]:
        """(numerator, normaliser) feature sizes: both m."""
        return self.m, self.m

    def flops(self, head_dim: int) -> float:
        """The random projections of one query and one key onto the m features (per head)."""
        return 2 * 2.0 * self.m * head_dim

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw a new random projection in place."""
        w = gaussian_orthogonal_matrix(self.m, self.head_dim, orthogonal=self.orthogonal, device=self.projection.device)
        self.projection.copy_(w)

    def forward(
        self, q: Tensor, k: Tensor, ctx: AttentionContext, *, keep: Tensor | None, cache: LinearAttentionCache | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k (b, h, n, d) -> features (b, h, n, m) as (q, k, q, k); keep (b, 1, n, 1) zeroes padded keys."""
        if self.training and self.redraw_interval > 0:
            if self.training_calls and self.training_calls % self.redraw_interval == 0:
                self.redraw()
            self.training_calls += 1
        q, k = ctx.positional.rotate(q, k, ctx.q_pos, ctx.q_pos)
        qf = favor_query_features(q, self.projection, self.scale)
        ka = favor_logits(k, self.projection, self.scale)  # (b, h, n, m)
        if keep is not None:
            ka = ka.masked_fill(keep == 0, float("-inf"))
        shift = ka.amax(dim=(-1, -2), keepdim=True).clamp_min(-1e4)  # (b, h, 1, 1)
        if cache is not None:
            shift = torch.maximum(shift, cache.shift)
            cache.rescale(shift)
        kf = (ka - shift).exp() / math.sqrt(self.m)
        return qf, kf, qf, kf


@dataclass
class PerformerOptions:
    """Options of attention kind 'performer'.

    num_features: random features m per head; orthogonal: orthogonal blocks (FAVOR+) or iid;
    redraw_interval: redraw the features every this many training steps (0: never);
    chunk_size: chunk length of the causal form; eps: added to the normaliser.
    """

    num_features: int = 128
    orthogonal: bool = True
    redraw_interval: int = 1000
    chunk_size: int = 64
    eps: float = 1e-6


@ATTENTIONS.register("performer")
def build_performer(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Performer attention with FAVOR+ positive orthogonal random features."""
    opts = parse_options(PerformerOptions, cfg.options, "model.attention.options (performer)")
    check_kernelized_config(cfg, "performer", ctx.cross)
    if opts.num_features < 1 or opts.chunk_size < 1 or opts.redraw_interval < 0:
        raise ConfigError(
            "model.attention.options: num_features and chunk_size must be >= 1 and redraw_interval >= 0 "
            f"(got {opts.num_features}, {opts.chunk_size}, {opts.redraw_interval})"
        )
    head_dim = cfg.head_dim or ctx.dim // cfg.num_heads
    features = FavorFeatures(
        head_dim, opts.num_features, orthogonal=opts.orthogonal, redraw_interval=opts.redraw_interval, scale=cfg.scale
    )
    return kernelized_from_config(cfg, ctx.dim, features, chunk_size=opts.chunk_size, eps=opts.eps)
