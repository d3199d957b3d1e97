"""LM-Infinite (Han et al. 2023): a RoPE model pretrained on contexts of length L reads far
longer inputs, with no training, through two changes to its attention:

- a Λ-shaped mask: each query sees the first `num_global` positions and the `window` most
  recent ones (itself included), nothing in between;
- a distance ceiling: the rotary distance between a query and a key is min(i - j, ceiling),
  so no attention logit sees a relative position the model never saw in pretraining.

Keys inside the window are within `window` <= `ceiling` of their query, so only the global
keys beyond the window ever have their distance lowered. RoPE rotations compose (rotating a
query already rotated to position i by delta puts it at i + delta), so the ceiling is applied
to the stored, already rotated queries and keys: for global key j the query is rotated by
min(0, ceiling - (i - j)) before the dot product.

`apply_lm_infinite(model, ...)` switches every self-attention layer of a model whose
positional encoding is RoPE to this attention; the weights are untouched and
`remove_lm_infinite` switches back. The computation runs in query chunks (each chunk sees at
most `num_global` + `window` + chunk keys), so time and memory grow linearly with the length.

Legend: `b` batch, `h` query heads, `g` key/value heads, `n` queries, `m` keys, `d` head dim,
`G` global keys, `c` queries in a chunk, `w` keys in its local span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..nn.attention.kernels import repeat_kv
from ..nn.attention.mha import MultiHeadAttention
from ..nn.positional.rope import RoPE, apply_rope, rope_angles
from ..protocol import LongContext

CHUNK = 512  # queries per chunk


@dataclass(frozen=True)
class LMInfiniteOptions:
    """window: most recent positions each query sees (itself included); num_global: first
    positions every query sees; ceiling: largest rotary distance (default: the window)."""

    window: int
    num_global: int = 10
    ceiling: int | None = None

    def check(self) -> "LMInfiniteOptions":
        if self.window < 1:
            raise ConfigError(f"lm_infinite window must be >= 1, got {self.window}")
        if self.num_global < 0:
            raise ConfigError(f"lm_infinite num_global must be >= 0, got {self.num_global}")
        ceiling = self.window if self.ceiling is None else self.ceiling
        if ceiling < self.window:
            raise ConfigError(
                f"lm_infinite ceiling ({ceiling}) must be at least the window ({self.window}): keys inside the "
                "window keep their true distance, which would exceed the ceiling"
            )
        return LMInfiniteOptions(self.window, self.num_global, ceiling)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of q (b, h, c, d) over k, v (b, h, w, d) where `visible` (b, 1, c, w)
    -> the output (b, h, c, d) in fp32 and each row's log-sum-exp of logits (b, h, c). Every
    row must see at least one key. Inference on CPU runs PyTorch's fused flash kernel, which
    returns the log-sum-exp; otherwise (gradients, other devices) the logits are explicit."""
    if q.device.type == "cpu" and not (q.requires_grad or k.requires_grad or v.requires_grad) and _FLASH is not None:
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        out, lse = _FLASH(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
        return out.float(), lse.float()
    logits = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    return torch.matmul(torch.exp(logits - lse[..., None]), v.float()), lse


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def lm_infinite_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, rope: RoPE, opts: LMInfiniteOptions,
    *, scale: float | None = None,
) -> Tensor:
    """LM-Infinite attention of rotated queries q (b, h, n, d) at positions q_pos (b, n) over
    rotated keys k and values v (b, g, m, d) at k_pos (b, m) (causal; keys in increasing
    position order, the queries the last n of them) -> (b, h, n, d).

    Each chunk of queries attends in two parts merged by their log-sum-exps: its local span
    (the keys within `window` of some query of the chunk, at their true distances; one fused
    kernel call) and the global keys outside a query's window, at distance min(i - j, ceiling).
    For the latter the ceiling logit is that of the query rotated to position `ceiling` against
    the key rotated back to position 0, so one rotation of the chunk serves every global key."""
    opts = opts.check()
    b, h, n, d = q.shape
    m = k.shape[2]
    groups = h // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    ceiling = opts.ceiling
    assert ceiling is not None
    out = torch.empty_like(q)
    offset = m - n
    G = min(opts.num_global, m)
    g_pos = k_pos[:, :G]  # (b, G)
    k_glob = repeat_kv(k[:, :, :G], groups).float()  # (b, h, G, d), at their true positions
    cos, sin = rope_angles(-g_pos, rope.rotary_dim, rope.options.base)
    k_glob0 = apply_rope(k_glob, cos, sin, interleaved=rope.options.interleaved)  # turned back to position 0
    v_glob = repeat_kv(v[:, :, :G], groups).float()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        lo = max(0, s + offset - opts.window + 1)  # first key any query of the chunk may see locally
        hi = e + offset
        qc, qp = q[:, :, s:e], q_pos[:, s:e]  # (b, h, c, d), (b, c)
        dist = qp[:, :, None] - k_pos[:, None, lo:hi]  # (b, c, w)
        local, lse = _attention_with_lse(qc, repeat_kv(k[:, :, lo:hi], groups), repeat_kv(v[:, :, lo:hi], groups),
                                         ((dist >= 0) & (dist < opts.window))[:, None], scale)
        gdist = qp[:, :, None] - g_pos[:, None, :]  # (b, c, G)
        outside = gdist >= opts.window  # global keys the local span does not hold (counted there otherwise)
        if G and bool(outside.any()):
            cq, sq = rope_angles(ceiling - qp, rope.rotary_dim, rope.options.base)
            at_ceiling = torch.matmul(apply_rope(qc, cq, sq, interleaved=rope.options.interleaved), k_glob0.transpose(-1, -2))
            true = torch.matmul(qc.float(), k_glob.transpose(-1, -2))  # (b, h, c, G)
            glob = torch.where((gdist >= ceiling)[:, None], at_ceiling, true) * scale
            glob = glob.masked_fill(~outside[:, None], float("-inf"))
            lse_g = torch.logsumexp(glob, -1)  # (b, h, c); -inf where no global key is outside
            total = torch.logaddexp(lse, lse_g)
            w_g = torch.exp(lse_g - total)[..., None]
            read = torch.matmul(torch.exp(glob - total[..., None]), v_glob)  # already weighted by w_g
            local = local * (1 - w_g) + read
        out[:, :, s:e] = local.to(out.dtype)
    return out


def _attend(layer: MultiHeadAttention, opts: LMInfiniteOptions):  # type: ignore[no-untyped-def]
    plain = layer.attend

    def attend(q: Tensor, k: Tensor, v: Tensor, ctx) -> Tensor:  # type: ignore[no-untyped-def]
        if not isinstance(ctx.positional, RoPE) or not ctx.causal:
            return plain(q, k, v, ctx)  # cross-attention, or the encoder of an encoder-decoder: not an LM's context
        if int((ctx.q_pos[:, -1] - ctx.k_pos[:, 0]).max()) < opts.window:
            return plain(q, k, v, ctx)  # every key within every query's window: the Λ is plain causal attention
        masked = ctx.mask is not None and not bool(ctx.mask.all())
        if masked or ctx.bias is not None:
            what = "padding (rows of different lengths) or a boolean mask" if masked else "an additive attention mask"
            raise ConfigError(
                f"LM-Infinite reads unpadded sequences without attention masks, and this input has {what} beyond the "
                f"window of {opts.window}: run rows of equal length (or one at a time), without a mask"
            )
        return lm_infinite_attention(q, k, v, ctx.q_pos, ctx.k_pos, ctx.positional, opts, scale=layer.scale)

    attend.lm_infinite = opts  # type: ignore[attr-defined]
    attend.plain = plain  # type: ignore[attr-defined]
    return attend


def apply_lm_infinite(model: nn.Module, window: int | None = None, num_global: int = LMInfiniteOptions.num_global, ceiling: int | None = None) -> nn.Module:
    """Switch the causal self-attention layers of a RoPE model to LM-Infinite (in place; returns
    the model). window and ceiling default to the model's trained context
    (`model.config.max_seq_len`). Raises ConfigError for a model without RoPE or one that is not
    causal; its forward raises ConfigError for padded or masked input that reaches past the
    window (the Λ of a padded row would start at its padding)."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.positional.kind != "rope":
        kind = None if cfg is None else cfg.positional.kind
        raise ConfigError(f"LM-Infinite bounds rotary distances and needs a RoPE model; this model's positional encoding is {kind!r}")
    if not getattr(model, "causal", False):
        raise ConfigError(f"LM-Infinite extends the context of causal language models; this {cfg.arch!r} model attends both ways")
    trained = cfg.max_seq_len
    opts = LMInfiniteOptions(window or trained, num_global, ceiling or (max(trained, window) if window else trained)).check()
    layers = [mod for mod in model.modules() if isinstance(mod, MultiHeadAttention)]
    for layer in layers:
        if not hasattr(layer.attend, "lm_infinite"):
            layer.attend = _attend(layer, opts)  # type: ignore[method-assign]
    model.long_context = LongContext(window=opts.window, sinks=opts.num_global)  # decoding keeps a Λ cache
    return model


def remove_lm_infinite(model: nn.Module) -> nn.Module:
    """Undo `apply_lm_infinite`."""
    for mod in model.modules():
        if isinstance(mod, MultiHeadAttention) and hasattr(mod.attend, "lm_infinite"):
            mod.attend = mod.attend.plain  # type: ignore[method-assign]
    if "long_context" in vars(model):
        del model.long_context
    return model
