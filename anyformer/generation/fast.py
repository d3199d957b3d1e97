"""Faster one-token decoding steps: every linear layer fed a single row runs as a GEMV that
reads each weight once, at memory speed, accumulating in fp32.

At batch 1 a decoding step is a chain of matrix-vector products, so its speed is bounded by
how fast the weights stream from memory. The BLAS path behind `F.linear` for a (1, d) input
runs well below that bound on some CPUs (notably for the vocabulary-sized LM head, and for
bf16 weights). Two faster paths, best first:

- a small C++ kernel (cpu_gemv.cpp: AVX-512 FMA for fp32, AVX512-BF16 dot products for bf16,
  rows split across threads), built once per machine with the PyTorch C++ extension tools
  (~30 s, cached under ~/.cache/torch_extensions) on CPUs that have those instructions;
- otherwise `torch.compile` of `(W * x).sum(-1)`: one vectorised reduction loop that does not
  materialise the product (any device, any CPU with a C++ compiler).

`FastLinears` routes a model's one-row linear calls there only while it is active, so training
and multi-row calls keep the usual path.

Legend: `o` output features, `k` input features.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One row times a weight: x (k,), weight (o, k), bias (o,) or None -> (o,), summed in fp32
    and returned in x's dtype. Eager this materialises the product; compiled it does not."""
    out = (weight.float() * x.float()).sum(-1)  # (o,)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


_COMPILED: dict[str, Callable[..., Tensor]] = {}
_NATIVE: dict[str, Any] = {}


def native_gemv() -> Any | None:
    """The C++ kernel module (functions `supported()` and `gemv(x, weight, bias)`), built on
    first use; None if it cannot be built here (no compiler) or this CPU lacks AVX-512 BF16."""
    if "module" not in _NATIVE:
        module = None
        try:
            from torch.utils import cpp_extension

            source = os.path.join(os.path.dirname(__file__), "cpu_gemv.cpp")
            module = cpp_extension.load(name="anyformer_cpu_gemv", sources=[source], extra_cflags=["-O3", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], verbose=False)
            if not module.supported():
                module = None
        except Exception as err:  # no toolchain / headers: the compiled fallback takes over
            warnings.warn(f"C++ decoding kernel unavailable ({type(err).__name__}: {str(err)[:200]}); using torch.compile")
            module = None
        _NATIVE["module"] = module
    return _NATIVE["module"]


def fast_gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`gemv` through the fastest available path: the C++ kernel for contiguous fp32/bf16 CPU
    tensors of one dtype, else the compiled reduction."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and weight.is_contiguous()):
        module = native_gemv()
        if module is not None:
            return module.gemv(x.contiguous(), weight, None if bias is None else bias.contiguous())
    return compiled_gemv()(x, weight, bias)


def compiled_gemv() -> Callable[..., Tensor]:
    """`gemv` compiled once per process (shapes symbolic, so every layer size shares it)."""
    if "gemv" not in _COMPILED:
        # one graph per dtype and thread count (torch guards on both); the default limit of 8
        # recompilations would silently send later calls back to eager after a few changes
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED["gemv"] = torch.compile(gemv, dynamic=True)
    return _COMPILED["gemv"]


class FastLinears:
    """Context manager: while active, every `nn.Linear` in `model` fed one row (shape (..., k)
    holding a single k-vector) and not needing gradients runs `fast_gemv`; other calls take the
    usual `F.linear` path. Each layer's `forward` is overridden on the instance and restored on
    exit, so no other code (and no other model) is affected, and nothing is intercepted besides
    the linear layers themselves.

    If the fast path fails (no C++ toolchain, unsupported device), it warns once and uses
    `F.linear` for the rest of the context's life (`failed` becomes True).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if type(m) is nn.Linear]
        self.failed = False

    def _forward(self, layer: nn.Linear, x: Tensor) -> Tensor:
        weight, bias = layer.weight, layer.bias
        if not self.failed and x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and weight.requires_grad):
            try:
                return fast_gemv(x.reshape(-1), weight, bias).view(*x.shape[:-1], weight.shape[0])
            except Exception as err:  # compile/toolchain failure: keep decoding, eagerly
                self.failed = True
                warnings.warn(f"compiled decoding unavailable ({type(err).__name__}: {err}); using eager linear layers")
        return F.linear(x, weight, bias)

    def __enter__(self) -> "FastLinears":
        for layer in self.layers:  # straight into the instance dict: nn.Module.__setattr__ is slow per step
            layer.__dict__["forward"] = functools.partial(self._forward, layer)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
