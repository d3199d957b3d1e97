"""What the RWKV mixers share: the token shift, the decoding state that carries it across
calls, the left-padding rule, and RWKV's channel mixing as feed-forward kinds.

Legend: `b` batch, `n` new tokens, `d` model width, `f` hidden width.

Token shift: every RWKV sublayer mixes each token's input with the previous token's,
per channel, `x + (x_prev - x) * mu` (RWKV-7's convention; RWKV-4 writes it as
`x * mu' + x_prev * (1 - mu')`). The previous token of the first one is zero at the start of
a sequence, or the last input of the earlier call when decoding with a state.

Channel mixing (Peng et al. 2023, 2025), registered as feed-forward kinds that keep that
shift state across decoding calls:

    rwkv_channel   (RWKV-7)  k = relu(W_k shift(x))^2,  out = W_v k
    rwkv4_channel  (RWKV-4)  out = sigmoid(W_r shift_r(x)) * W_v relu(W_k shift_k(x))^2

Padding: a recurrence reads its inputs in order, so RWKV takes left padding only (a
key-padding mask whose rows are pads, then tokens). Padded positions are zeroed before the
shift and change no state, so a left-padded row gives the outputs of the same row unpadded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import FeedForwardConfig
from ..build_context import BuildContext
from ..feedforward import FEEDFORWARDS, FeedForward, hidden_size


def left_padding_keep(mask: Tensor | None, n: int, kind: str) -> Tensor | None:
    """The (b, n) float keep of the last n tokens from a key-padding mask (b, 1, 1, m), or
    None without a mask. Raises ValueError for a mask that is not key padding, or padding
    that is not on the left."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            f"{kind} reads tokens in order and takes a key-padding attention mask only (b, m); got a mask of shape "
            f"{tuple(mask.shape)}. Drop the custom mask, or use an attention kind such as 'mha'"
        )
    keep = mask[:, 0, 0].bool()  # (b, m)
    if bool((keep[:, 1:].long() < keep[:, :-1].long()).any()):
        raise ValueError(
            f"{kind} takes left padding only (pads before the tokens of a row); this attention mask has padding after "
            "or between tokens. Pad on the left (tokenizer padding_side='left'), or run rows of unequal length one by one"
        )
    return keep[:, -n:].to(torch.float32)


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """The previous token's input at every position: (b, n, d) from x (b, n, d) and the
    input before it, prev (b, d) (None: zero, the start of a sequence)."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], 1)


class ShiftState(nn.Module):
    """The decoding state of a token shift: the last input of the previous call, `last`
    (b, d) in the model's dtype. Buffers are non-persistent (a checkpoint never holds it)."""

    def __init__(self, batch: int, dim: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(batch, dim, dtype=dtype, device=device), persistent=False)
        self._max_len = max_len
        self.length = 0

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def batch(self) -> int:
        return self.last.shape[0]

    @property
    def device(self) -> torch.device:
        return self.last.device

    def previous(self) -> Tensor | None:
        """The input before the next call's first token (None before the first call)."""
        return self.last if self.length else None

    def store(self, x: Tensor) -> None:
        """Keep the last input of this call's x (b, n, d)."""
        self.last.copy_(x[:, -1])
        self.length += x.shape[1]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (b',), in that order (beam search)."""
        self.last = self.last.index_select(0, index)


class RecurrentState(nn.Module):
    """Base of a time mixing's decoding state: a token shift (`shift`, a ShiftState) whose
    batch, max_len and device it reports, plus the recurrence's own buffers (subclasses)."""

    def __init__(self, shift: ShiftState) -> None:
        super().__init__()
        self.shift = shift

    @property
    def max_len(self) -> int:
        return self.shift.max_len

    @property
    def batch(self) -> int:
        return self.shift.batch

    @property
    def device(self) -> torch.device:
        return self.shift.device


def shift_cache(spec, dim: int, kind: str) -> ShiftState:  # type: ignore[no-untyped-def]
    """A ShiftState from a CacheSpec; a rolling (window) cache does not apply to a recurrence."""
    if spec.window is not None:
        raise ValueError(
            f"{kind} decodes with a constant-size state that keeps every token in it; a rolling (sink + window) cache "
            "does not apply. Drop `window`"
        )
    return ShiftState(spec.batch, dim, spec.max_len, dtype=spec.dtype, device=spec.device)


def layer_ratios(layer_index: int, num_layers: int) -> tuple[float, float]:
    """RWKV's depth-dependent initialisation ratios of a layer: (0 at the first layer -> 1 at
    the last, 1 at the first -> 1/L at the last)."""
    L, i = max(1, num_layers), layer_index
    return (i / (L - 1) if L > 1 else 0.0), 1.0 - i / L


class _ChannelMix(FeedForward):
    """Base of the channel mixes: a token shift with its state, and the squared-ReLU key."""

    kind = "rwkv_channel"

    def __init__(self, dim: int, hidden: int, *, ratio: float) -> None:
        nn.Module.__init__(self)
        self.dim, self.ratio = dim, ratio
        self.key = nn.Linear(dim, hidden, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    @classmethod
    def build(cls, cfg: FeedForwardConfig, ctx: BuildContext) -> "FeedForward":
        if cfg.bias or cfg.dropout or cfg.activation not in (None, "relu"):
            raise ValueError(
                f"ffn kind '{cls.kind}' is RWKV's channel mixing (squared ReLU, no biases, no dropout); "
                "leave model.ffn.activation, bias and dropout unset"
            )
        return cls(ctx.dim, hidden_size(ctx.dim, cfg.hidden_mult, cfg.hidden_dim, cfg.multiple_of), ratio=layer_ratios(ctx.layer_index, ctx.num_layers)[1])

    def make_cache(self, spec) -> ShiftState:  # type: ignore[no-untyped-def]
        """The token-shift state of decoding (the block keeps it next to the attention's cache)."""
        return shift_cache(spec, self.dim, f"ffn kind '{self.kind}'")

    def _shifted(self, x: Tensor, ctx, cache: ShiftState | None) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
        """(x with padded positions zeroed, the previous token's input), storing the state."""
        keep = left_padding_keep(getattr(ctx, "mask", None), x.shape[1], f"ffn kind '{self.kind}'")
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        prev = token_shift(x, None if cache is None else cache.previous())
        if cache is not None:
            cache.store(x)
        return x, prev


@FEEDFORWARDS.register("rwkv_channel")
class RWKV7ChannelMix(_ChannelMix):
    """RWKV-7's channel mixing: value(relu(key(x + (x_prev - x) * x_k))^2).

    Parameters (the official names): x_k (d,), key (f <- d), value (d <- f)."""

    def __init__(self, dim: int, hidden: int, *, ratio: float) -> None:
        super().__init__(dim, hidden, ratio=ratio)
        self.x_k = nn.Parameter(torch.zeros(dim))

    def reset_extra_parameters(self) -> None:
        """The RWKV-7 reference's initialisation: x_k = 1 - (c/d)^(ratio^4), key uniform in
        +-0.5/sqrt(d), value zero (each layer starts as the identity of the residual)."""
        ddd = torch.arange(self.dim, dtype=torch.float32) / self.dim
        with torch.no_grad():
            self.x_k.copy_(1.0 - ddd.pow(self.ratio**4))
            bound = 0.5 / self.dim**0.5
            self.key.weight.uniform_(-bound, bound)
            self.value.weight.zero_()

    def forward(self, x: Tensor, ctx=None, *, cache: ShiftState | None = None) -> Tensor:  # type: ignore[no-untyped-def]
        x, prev = self._shifted(x, ctx, cache)
        k = torch.relu(self.key(x + (prev - x) * self.x_k)).square()  # (b, n, f)
        return self.value(k)


@FEEDFORWARDS.register("rwkv4_channel")
class RWKV4ChannelMix(_ChannelMix):
    """RWKV-4's channel mixing: sigmoid(receptance(r_in)) * value(relu(key(k_in))^2), with
    r_in = x * time_mix_receptance + x_prev * (1 - time_mix_receptance) and k_in likewise.

    Parameters (transformers' names): time_mix_key, time_mix_receptance (d,), key (f <- d),
    receptance (d <- d), value (d <- f)."""

    kind = "rwkv4_channel"

    def __init__(self, dim: int, hidden: int, *, ratio: float) -> None:
        super().__init__(dim, hidden, ratio=ratio)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.time_mix_key = nn.Parameter(torch.ones(dim))
        self.time_mix_receptance = nn.Parameter(torch.ones(dim))

    def reset_extra_parameters(self) -> None:
        """The RWKV-4 reference's initialisation: time_mix = (c/d)^ratio for key and
        receptance; value and receptance zero."""
        ddd = torch.arange(self.dim, dtype=torch.float32) / self.dim
        with torch.no_grad():
            self.time_mix_key.copy_(ddd.pow(self.ratio))
            self.time_mix_receptance.copy_(ddd.pow(self.ratio))
            self.value.weight.zero_()
            self.receptance.weight.zero_()

    def forward(self, x: Tensor, ctx=None, *, cache: ShiftState | None = None) -> Tensor:  # type: ignore[no-untyped-def]
        x, prev = self._shifted(x, ctx, cache)
        k_in = torch.lerp(prev, x, self.time_mix_key.to(x.dtype))  # x * mu + prev * (1 - mu)
        r_in = torch.lerp(prev, x, self.time_mix_receptance.to(x.dtype))
        k = torch.relu(self.key(k_in)).square()  # (b, n, f)
        return torch.sigmoid(self.receptance(r_in)) * self.value(k)
