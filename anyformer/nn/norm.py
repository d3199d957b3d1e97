"""Normalisation layers; statistics are computed in fp32 and cast back.

Legend: `...` any leading dims, `d` the normalised (last) dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, in fp32."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        # the same operations in one call (about half the per-call cost, which decoding pays per norm)
        return nn.functional.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        return (weight.float() * y).to(x.dtype)
    return y.to(x.dtype)


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016), with or without a bias; statistics in fp32.

    Args:
        dim: normalised size `d`.
        eps: added to the variance.
        bias: learn an additive bias.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        if x.dtype == self.weight.dtype:
            # one call; torch computes reduced-precision layer norms with fp32 statistics and
            # affine transform internally, rounding once, as the general path below does
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        b = self.bias.float() if self.bias is not None else None
        y = nn.functional.layer_norm(x.float(), x.shape[-1:], self.weight.float(), b, self.eps)
        return y.to(x.dtype)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): a learned scale, no bias.

    Args:
        dim: normalised size `d`.
        eps: added to the mean square.
        bias: must be False (accepted so every norm takes the same arguments); True raises
            instead of being silently dropped.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        if bias:
            raise ValueError(
                "RMSNorm has no bias, but bias=True was asked for: set model.norm.bias=false "
                "(or model.norm.kind=layernorm for a norm with a bias)"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return rms_norm(x, self.weight, self.eps)


@NORMS.register("none")
class NoNorm(nn.Module):
    """No normalisation: the input unchanged (compiled programs such as tracr's are norm-free;
    with it the residual stream is exactly the sum of the sublayers' outputs).

    Args:
        dim: accepted so every norm takes the same arguments; holds no weights.
        eps: unused.
        bias: must be False: a norm that is not there has no bias to learn.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        if bias:
            raise ValueError("model.norm.kind=none has no bias, but bias=True was asked for: set model.norm.bias=false")

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return x
