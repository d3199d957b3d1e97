"""Faster one-token decoding steps: every linear layer fed a single row runs as a GEMV that
reads each weight once, at memory speed, accumulating in fp32.

At batch 1 a decoding step is a chain of matrix-vector products, so its speed is bounded by
how fast the weights stream from memory. The BLAS path behind `F.linear` for a (1, d) input
runs well below that bound on some CPUs (notably for the vocabulary-sized LM head, and for
bf16 weights). Two faster paths, best first:

- a small C++ kernel (cpu_decode.cpp: AVX-512 FMA for fp32, AVX512-BF16 dot products for bf16,
  rows split across threads), built once per machine with the PyTorch C++ extension tools
  (~30 s, cached under ~/.cache/anyformer/native) on CPUs that have those instructions, and
  registered as the operators torch.ops.anyformer.gemv / gemv_multi, so torch.compile traces
  through it;
- otherwise `torch.compile` of `(W * x).sum(-1)`: one vectorised reduction loop that does not
  materialise the product (any device, any CPU with a C++ compiler).

`FastLinears` routes a model's one-row linear calls there only while it is active, so training
and multi-row calls keep the usual path.

Legend: `o` output features, `k` input features.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..native import decode_kernels


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One row times a weight: x (k,), weight (o, k), bias (o,) or None -> (o,), summed in fp32
    and returned in x's dtype. Eager this materialises the product; compiled it does not."""
    out = (weight.float() * x.float()).sum(-1)  # (o,)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def native_gemv() -> Any | None:
    """The C++ kernel module (functions `supported()`, `gemv(x, weight, bias)` and
    `gemv_multi(x, weights, biases)`), built on first use; None if it cannot be built here (no
    compiler) or this CPU lacks AVX-512 BF16 (see anyformer.native)."""
    return decode_kernels()


def fast_path_available(model: nn.Module) -> bool:
    """True when the fast decoding path applies to `model`: float32 or bfloat16 weights on a
    CPU where the native kernels run (else decoding keeps the plain module path, so the fast
    path never costs a compile of its own)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return False
    return native_gemv() is not None


def fast_gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`gemv` through the fastest available path: the C++ kernel for contiguous fp32/bf16 CPU
    tensors of one dtype, else the compiled reduction."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and weight.is_contiguous()):
        module = native_gemv()
        if module is not None:
            # the registered operator when torch.compile traces; the direct binding (cheaper per call) eagerly
            call = torch.ops.anyformer.gemv if torch.compiler.is_compiling() else module.gemv
            return call(x.contiguous(), weight, None if bias is None else bias.contiguous())
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


# Sibling layers that read the same input, by the attribute names of the library's modules:
# attention's q/k/v projections and SwiGLU's gate/up. One pass over all their weights replaces
# a pass per layer (the threads start once).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate", "up"))


class _Siblings:
    """Linear layers of one module that read the same input. The first of them called with a
    row computes all of their outputs in one native call and keeps the others' parts for their
    own calls with that same tensor. If a part is never claimed (cross-attention calls k and v
    on the encoder memory, not on x), the group stops fusing: the extra work would be wasted."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.x: Tensor | None = None
        self.parts: dict[int, Tensor] = {}
        self.enabled = True
        # the weights as they are when decoding starts (FastLinears is made per generation)
        self.weights = [layer.weight for layer in layers]
        self.biases = [layer.bias.contiguous() for layer in layers] if layers[0].bias is not None else []  # type: ignore[union-attr]
        self.dtype = self.weights[0].dtype

    @staticmethod
    def find(module: nn.Module) -> "list[_Siblings]":
        out = []
        for names in SIBLINGS:
            layers = [getattr(module, n, None) for n in names]
            if not all(type(layer) is nn.Linear for layer in layers):
                continue
            first = layers[0]
            same = all(
                layer.in_features == first.in_features and layer.weight.dtype == first.weight.dtype
                and layer.weight.device.type == "cpu" and layer.weight.is_contiguous() and (layer.bias is None) == (first.bias is None)
                and (layer.bias is None or layer.bias.dtype == first.weight.dtype)
                for layer in layers
            )
            if same:
                out.append(_Siblings(layers))  # type: ignore[arg-type]
        return out

    def run(self, layer: nn.Linear, x: Tensor, multi: Callable[..., Tensor]) -> Tensor | None:
        """layer's output for the one-row x, from a fused call; None if this group cannot serve it."""
        if self.x is x:
            part = self.parts.pop(id(layer), None)
            if part is not None:
                if not self.parts:
                    self.x = None
                return part
        if not self.enabled or x.dtype != self.dtype:
            return None
        if self.parts:  # a part from the last fused call went unclaimed
            self.enabled, self.x, self.parts = False, None, {}
            return None
        out = multi(x.reshape(-1).contiguous(), self.weights, self.biases)
        shape = x.shape[:-1]
        mine = None
        for lay, part in zip(self.layers, out.split(self.sizes)):
            part = part.view(*shape, lay.out_features)
            if lay is layer:
                mine = part
            else:
                self.parts[id(lay)] = part
        self.x = x if self.parts else None
        return mine


class FastLinears:
    """Context manager: while active, every `nn.Linear` in `model` fed one row (shape (..., k)
    holding a single k-vector) and not needing gradients runs `fast_gemv`; other calls take the
    usual `F.linear` path. Each layer's `forward` is overridden on the instance and restored on
    exit, so no other code (and no other model) is affected, and nothing is intercepted besides
    the linear layers themselves. Sibling layers reading the same input (`SIBLINGS`) run as one
    native call when the C++ kernel is available.

    If the fast path fails (no C++ toolchain, unsupported device), it warns once and uses
    `F.linear` for the rest of the context's life (`failed` becomes True).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if type(m) is nn.Linear]
        self.groups: dict[int, _Siblings] = {}
        for module in model.modules():
            for group in _Siblings.find(module):
                for layer in group.layers:
                    self.groups[id(layer)] = group
        self.failed = False
        self.native = native_gemv()
        # made once, so each entry installs the same objects (a compiled step's guards on them hold)
        self.forwards = [self._direct(layer) or functools.partial(self._forward, layer) for layer in self.layers]

    def _direct(self, layer: nn.Linear) -> Callable[[Tensor], Tensor] | None:
        """A lean forward for a CPU fp32/bf16 layer when the C++ kernel is here: per call it
        checks only what can change between calls (the input), and calls the kernel directly;
        everything else goes to the general `_forward`. None where the kernel cannot serve it."""
        native, weight, bias = self.native, layer.weight, layer.bias
        if (native is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or not weight.is_contiguous() or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
            return None
        gemv, multi, dtype, out_features = native.gemv, native.gemv_multi, weight.dtype, weight.shape[0]
        group = self.groups.get(id(layer))
        general = functools.partial(self._forward, layer)

        def forward(x: Tensor) -> Tensor:
            if (x.numel() != x.shape[-1] or x.dtype != dtype or (torch.is_grad_enabled() and weight.requires_grad)
                    or torch.compiler.is_compiling() or self.failed):
                return general(x)
            if group is not None:
                out = group.run(layer, x, multi)
                if out is not None:
                    return out
            return gemv(x.reshape(-1).contiguous(), weight, bias).view(*x.shape[:-1], out_features)

        return forward

    def _forward(self, layer: nn.Linear, x: Tensor) -> Tensor:
        weight, bias = layer.weight, layer.bias
        if not self.failed and x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and weight.requires_grad):
            try:
                group = self.groups.get(id(layer))
                if group is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
                    module = self.native
                    if module is not None:
                        multi = torch.ops.anyformer.gemv_multi if torch.compiler.is_compiling() else module.gemv_multi
                        out = group.run(layer, x, multi)
                        if out is not None:
                            return out
                return fast_gemv(x.reshape(-1), weight, bias).view(*x.shape[:-1], weight.shape[0])
            except Exception as err:  # compile/toolchain failure: keep decoding, eagerly
                self.failed = True
                warnings.warn(f"compiled decoding unavailable ({type(err).__name__}: {err}); using eager linear layers")
        return F.linear(x, weight, bias)

    def __enter__(self) -> "FastLinears":
        for layer, forward in zip(self.layers, self.forwards):  # straight into the instance dict: nn.Module.__setattr__ is slow per step
            layer.__dict__["forward"] = forward
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        for group in self.groups.values():  # no stale parts (and no kept tensors) across uses
            group.x, group.parts = None, {}
