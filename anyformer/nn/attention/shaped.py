"""Shaped attention (Noci et al. 2023, "The Shaped Transformer"), in the trainable form of He &
Hofmann 2023, "Simplifying Transformer Blocks" (arXiv 2311.01906; values as in the authors' code,
bobby-he/simplified_transformers, config `skipless`).

Legend: `b` batch, `h` heads, `n` queries, `m` keys (the n queries are the last n of the m keys).

Each head mixes its values with

    A = alpha * I + beta * softmax(q k^T * scale) - gamma * C

alpha, beta, gamma: trainable per-head scalars (paper: all 1 at initialisation).
I: the identity in key coordinates, I[i, j] = 1 iff j == i + (m - n) (query i reads its own
   key; with a KV cache the new queries are the last n keys). It is never masked: it is the
   skip connection the block no longer has.
C: the centering matrix, the softmax of all-zero logits under the same mask: uniform over the
   keys a query may see (causal: row i uniform over keys 0..i; bidirectional: over all keys;
   padding, user masks, -inf entries of a user's additive mask and a kernel's sparsity pattern
   excluded). Positional biases (ALiBi, T5) are not part of C.

The query projection is zero at initialisation, so the softmax is C and, with beta = gamma,
A = alpha * I: every layer starts as the identity (exactly so unless a positional encoding adds
a bias to the logits). Following the paper (its SAS blocks), the value and output projections
are the identity by default (`identity_values`, `identity_projection`); the head layout must
then cover the model width with one value head per query head. The authors' code also keeps a
trainable value matrix in the first layer (`first_layer_value_resid_gain`); that is not done
here (set `identity_values: false` to train values everywhere).

The combined matrix is not a probability distribution, so the layer runs the explicit path
(logits materialised); `attn_store` receives A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from .context import AttentionContext
from .kernels import full_mask, masked_softmax
from .masks import combine_masks
from .mha import MultiHeadAttention, head_dim_of, projections, qk_norms
from .registry import ATTENTIONS, KERNELS


def shifted_identity(n: int, m: int, device: torch.device | None = None) -> Tensor:
    """(n, m) fp32: 1 where key j is query i's own position, j == i + (m - n)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return (j == i + (m - n)).float()


def centering_matrix(visible: Tensor | None, n: int, m: int, device: torch.device | None = None) -> Tensor:
    """The softmax of all-zero logits under `visible` (bool, broadcastable to (b, h, n, m),
    True = attend; None = all keys): uniform over each row's visible keys, fp32; a row with
    no visible key is 0. Shape (n, m) when `visible` is None, else `visible`'s broadcast shape."""
    zeros = torch.zeros(n, m, device=device)
    if visible is None:
        return masked_softmax(zeros)
    return masked_softmax(zeros.masked_fill(~visible, float("-inf")))


def shape_attention(probs: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, centre: Tensor) -> Tensor:
    """alpha * I + beta * probs - gamma * centre.

    probs: (b, h, n, m) softmax probabilities; alpha, beta, gamma: (h,) per-head scalars;
    centre: the centering matrix, broadcastable to probs. Returns (b, h, n, m) in fp32."""
    n, m = probs.shape[-2:]
    per_head = (1, -1, 1, 1)  # (h,) -> (1, h, 1, 1)
    a, b_, g = (p.float().view(per_head) for p in (alpha, beta, gamma))
    return (b_ * probs.float() - g * centre) + a * shifted_identity(n, m, probs.device)  # beta = gamma, P = C: exactly alpha*I


class ShapedAttention(MultiHeadAttention):
    """Multi-head attention whose heads mix values with alpha * I + beta * softmax - gamma * C
    (see the module doc).

    Args (beyond MultiHeadAttention's):
        alpha_init, beta_init, gamma_init: initial per-head values of the three scalars.
        zero_init_query: zero the query projection (and its bias) at initialisation.
    """

    def __init__(
        self, *, alpha_init: float, beta_init: float, gamma_init: float, zero_init_query: bool, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.alpha_init, self.beta_init, self.gamma_init = alpha_init, beta_init, gamma_init
        self.zero_init_query = zero_init_query
        self.alpha = nn.Parameter(torch.empty(self.num_heads))
        self.beta = nn.Parameter(torch.empty(self.num_heads))
        self.gamma = nn.Parameter(torch.empty(self.num_heads))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """The scalars at their initial values and, with `zero_init_query`, a zero query
        projection (called again by the model's weight init, after the linear layers)."""
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.constant_(self.beta, self.beta_init)
        nn.init.constant_(self.gamma, self.gamma_init)
        if self.zero_init_query:
            for p in self.q_proj.parameters():
                nn.init.zeros_(p)

    def visible(self, ctx: AttentionContext, n: int, m: int, device: torch.device) -> Tensor | None:
        """The keys each query may see (bool, broadcastable to (b, h, n, m); None = all): the
        mask of the softmax, plus the -inf entries of a user's additive mask."""
        mask = full_mask(ctx.mask, ctx.causal, n, m, device)
        pattern = getattr(self.kernel, "pattern", None)
        if pattern is not None:
            mask = combine_masks(mask, pattern.dense(n, m, device))
        if ctx.bias is not None:
            mask = combine_masks(mask, ~torch.isneginf(ctx.bias))
        return mask

    def combine(self, probs: Tensor, ctx: AttentionContext) -> Tensor:
        """(b, h, n, m) softmax probabilities -> the shaped matrix alpha*I + beta*P - gamma*C."""
        n, m = probs.shape[-2:]
        centre = centering_matrix(self.visible(ctx, n, m, probs.device), n, m, probs.device)
        return shape_attention(probs, self.alpha, self.beta, self.gamma, centre)


@dataclass
class ShapedOptions:
    """Options of attention kind 'shaped' (He & Hofmann 2023).

    alpha_init, beta_init, gamma_init: initial per-head values (paper: 1, 1, 1; beta = gamma
    makes the layer the identity at initialisation); zero_init_query: W_Q = 0 at
    initialisation (paper); identity_values, identity_projection: no value / output
    projection (paper), which needs num_heads * head_dim == dim (and num_kv_heads == num_heads
    for identity values).
    """

    alpha_init: float = 1.0
    beta_init: float = 1.0
    gamma_init: float = 1.0
    zero_init_query: bool = True
    identity_values: bool = True
    identity_projection: bool = True


def check_identity_layout(opts: ShapedOptions, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Raise a ConfigError when identity values or projection cannot fit the head layout."""
    named = [name for name in ("identity_values", "identity_projection") if getattr(opts, name)]
    if named and num_heads * head_dim != dim:
        raise ConfigError(
            f"attention kind 'shaped' with {' and '.join(named)}=true needs num_heads * head_dim == dim; got "
            f"{num_heads} * {head_dim} != {dim}. Set model.attention.head_dim to {dim // num_heads} (or unset it), or set "
            + " and ".join(f"model.attention.options.{name}=false" for name in named)
        )
    if opts.identity_values and num_kv_heads != num_heads:
        raise ConfigError(
            f"attention kind 'shaped' with identity_values=true reads one value head per query head; got num_kv_heads="
            f"{num_kv_heads} != num_heads={num_heads}. Unset model.attention.num_kv_heads, or set "
            "model.attention.options.identity_values=false to keep grouped value heads"
        )


@ATTENTIONS.register("shaped")
def build_shaped(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
    """Shaped attention with zero-initialised queries and identity values/projection (He &
    Hofmann 2023, "Simplifying Transformer Blocks")."""
    opts = parse_options(ShapedOptions, cfg.options, "model.attention.options (shaped)")
    if ctx.cross:
        raise ConfigError("attention kind 'shaped' is self-attention only; cross-attention uses 'mha'")
    head_dim = head_dim_of(cfg, ctx.dim)
    num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    check_identity_layout(opts, dim=ctx.dim, num_heads=cfg.num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    projs = projections(ctx.dim, cfg.num_heads, num_kv_heads, head_dim, bias=cfg.bias, out_bias=cfg.out_bias)
    if opts.identity_values:
        projs["v_proj"] = nn.Identity()
    if opts.identity_projection:
        projs["o_proj"] = nn.Identity()
    q_norm, k_norm = qk_norms(cfg, head_dim)
    return ShapedAttention(
        **projs,  # type: ignore[arg-type]
        num_heads=cfg.num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kernel=KERNELS.get(cfg.kernel),
        q_norm=q_norm,
        k_norm=k_norm,
        scale=cfg.scale,
        dropout=cfg.dropout,
        alpha_init=opts.alpha_init,
        beta_init=opts.beta_init,
        gamma_init=opts.gamma_init,
        zero_init_query=opts.zero_init_query,
    )


# with its default identity values, every query head reads its own value head (no GQA/MQA)
build_shaped.one_value_head_per_query_head = True  # type: ignore[attr-defined]
