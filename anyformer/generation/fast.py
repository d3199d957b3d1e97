"""Faster one-token decoding steps: every linear layer fed a single row runs as a compiled,
fused multiply-and-reduce over the weight (a GEMV that reads each weight once, at memory
speed), accumulating in fp32.

At batch 1 a decoding step is a chain of matrix-vector products, so its speed is bounded by
how fast the weights stream from memory. The BLAS path behind `F.linear` for a (1, d) input
runs well below that bound on some CPUs (notably for the vocabulary-sized LM head, and for
bf16 weights); `torch.compile` turns `(W * x).sum(-1)` into one vectorised reduction loop
without materialising the product. The model is left untouched: `GemvMode` intercepts
`F.linear` calls from outside, so training and multi-row calls keep the usual path.

Legend: `o` output features, `k` input features.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One row times a weight: x (k,), weight (o, k), bias (o,) or None -> (o,), summed in fp32
    and returned in x's dtype. Eager this materialises the product; compiled it does not."""
    out = (weight.float() * x.float()).sum(-1)  # (o,)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compiled_gemv() -> Callable[..., Tensor]:
    """`gemv` compiled once per process (shapes symbolic, so every layer size shares it)."""
    if "gemv" not in _COMPILED:
        # one graph per dtype and thread count (torch guards on both); the default limit of 8
        # recompilations would silently send later calls back to eager after a few changes
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED["gemv"] = torch.compile(gemv, dynamic=True)
    return _COMPILED["gemv"]


class GemvMode(TorchFunctionMode):
    """While active, `F.linear` on an input holding one row (shape (..., k) with one k-vector)
    runs the compiled `gemv`; other calls and anything needing gradients pass through.

    If compiling fails (no C++ toolchain, unsupported device), it warns once and falls back
    to `F.linear` for the rest of the mode's life.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and not self.failed:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and weight.requires_grad):
                try:
                    out = compiled_gemv()(x.reshape(-1), weight, bias)  # (o,)
                    return out.view(*x.shape[:-1], weight.shape[0])
                except Exception as err:  # compile/toolchain failure: keep decoding, eagerly
                    self.failed = True
                    warnings.warn(f"compiled decoding unavailable ({type(err).__name__}: {err}); using eager linear layers")
        return func(*args, **kwargs)
