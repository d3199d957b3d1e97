"""Differential attention (Ye et al. 2024, "Differential Transformer").

Legend: `b` batch, `n` queries, `m` keys, `h` query heads, `g` key/value heads, `d` head dim.

The h query heads and g key/value heads are split in halves. Differential head i (i < h/2)
subtracts two softmax maps, from query heads i and i + h/2 (keys from the matching halves of
the key heads), and reads values twice as wide, the two halves of the value heads side by side:

    A_i = softmax(q_i k^T) - lambda * softmax(q_{i+h/2} k'^T)
    out_i = (1 - lambda_init) * RMSNorm(A_i [v, v'])            (b, h/2, n, 2d)

lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init is learned through four d-vectors, and
lambda_init = 0.8 - 0.6 exp(-0.3 l) grows with the layer index l. Both maps run through the
configured fused kernel (two calls over all h heads, values of width d each), so the KV cache,
GQA and every positional encoding that acts on q/k work unchanged; this matches Hugging Face's
DiffLlama layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from ..norm import rms_norm
from .context import AttentionContext
from .kernels import repeat_kv
from .mha import MultiHeadAttention, mha_from_config
from .registry import ATTENTIONS


def lambda_init_schedule(layer_index: int) -> float:
    """The paper's depth-dependent lambda_init = 0.8 - 0.6 * exp(-0.3 * layer_index)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def swap_halves(v: Tensor) -> Tensor:
    """The value heads (b, g, m, d) with their two halves exchanged (one copy)."""
    half = v.shape[1] // 2
    return torch.cat([v[:, half:], v[:, :half]], 1)


class DifferentialAttention(MultiHeadAttention):
    """Multi-head attention whose heads pair up into differential heads (see the module doc).

    Args (beyond MultiHeadAttention's):
        lambda_init: the initial and offset value of lambda (`lambda_init_schedule(layer)`).
        lambda_std: std of the normal initialisation of the four lambda vectors.
        norm_eps: epsilon of the per-head RMSNorm (no learned scale). Defaults: `DifferentialOptions`.
    """

    def __init__(self, *, lambda_init: float, lambda_std: float, norm_eps: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if self.num_heads % 2 or self.num_kv_heads % 2:
            raise ConfigError(
                f"differential attention pairs heads: num_heads ({self.num_heads}) and num_kv_heads "
                f"({self.num_kv_heads}) must both be even"
            )
        d = self.head_dim
        self.lambda_init, self.lambda_std, self.norm_eps = lambda_init, lambda_std, norm_eps
        self.lambda_q1 = nn.Parameter(torch.zeros(d))
        self.lambda_k1 = nn.Parameter(torch.zeros(d))
        self.lambda_q2 = nn.Parameter(torch.zeros(d))
        self.lambda_k2 = nn.Parameter(torch.zeros(d))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Normal(0, lambda_std) lambda vectors (called again by the model's weight init)."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, std=self.lambda_std)

    def lam(self) -> Tensor:
        """The scalar lambda, in fp32."""
        l1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
        l2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
        return l1 - l2 + self.lambda_init

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Every head's softmax over both value halves: (b, h, n, 2d), the first-half values
        first. Query head i reads key/value head j = i // (h/g); its partner half is j +- g/2,
        so one kernel call over v (own half) and one over v with its halves swapped (partner
        half) give both without copying the cache twice."""
        half = q.shape[1] // 2
        if ctx.store is not None:  # inspection: store the differential maps (b, h/2, n, m)
            probs = self.probabilities(q, k, ctx)
            ctx.store.append(probs[:, :half] - self.lam() * probs[:, half:])
            groups = q.shape[1] // v.shape[1]
            own = probs.to(v.dtype) @ repeat_kv(v, groups)
            other = probs.to(v.dtype) @ repeat_kv(swap_halves(v), groups)
        else:
            own, other = super().attend(q, k, v, ctx), super().attend(q, k, swap_halves(v), ctx)  # (b, h, n, d) each
        first = torch.cat([own[:, :half], other[:, :half]], -1)  # heads i < h/2: own half is the first half
        second = torch.cat([other[:, half:], own[:, half:]], -1)  # heads i >= h/2: own half is the second half
        return torch.cat([first, second], 1)

    def mixing_flops(self, queries: int, keys: int, *, causal: bool) -> float:
        """Two kernel calls (own and swapped value halves), each with its scores and mixing."""
        return 2 * super().mixing_flops(queries, keys, causal=causal)

    def transform_heads(self, out: Tensor, ctx: AttentionContext) -> Tensor:
        """(b, h, n, 2d) -> (b, h/2, n, 2d): first-half maps minus lambda times second-half maps,
        per-head RMSNorm, times (1 - lambda_init)."""
        half = out.shape[1] // 2
        diff = out[:, :half] - self.lam().to(out.dtype) * out[:, half:]
        return (1 - self.lambda_init) * rms_norm(diff, None, self.norm_eps)


@dataclass
class DifferentialOptions:
    """Options of attention kind 'differential'.

    lambda_init: a fixed lambda_init for every layer (default: the paper's depth schedule);
    lambda_std: std of the lambda vectors' initialisation; norm_eps: per-head RMSNorm epsilon.
    """

    lambda_init: float | None = None
    lambda_std: float = 0.1
    norm_eps: float = 1e-5


@ATTENTIONS.register("differential")
def build_differential(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Differential attention with lambda_init from the layer index (Ye et al. 2024)."""
    opts = parse_options(DifferentialOptions, cfg.options, "model.attention.options (differential)")
    if ctx.cross:
        raise ConfigError("attention kind 'differential' is self-attention only; cross-attention uses 'mha'")
    if cfg.dropout:
        raise ConfigError("attention kind 'differential' does not define attention dropout; set model.attention.dropout=0")
    lambda_init = lambda_init_schedule(ctx.layer_index) if opts.lambda_init is None else opts.lambda_init
    return mha_from_config(
        cfg, ctx, cls=DifferentialAttention, lambda_init=lambda_init, lambda_std=opts.lambda_std, norm_eps=opts.norm_eps
    )
