"""The attention package's C++ CPU kernels (cpu_softmax.cpp): online-softmax block steps, the
fused chunked loops and one-query attention, loaded on first use (see anyformer.native)."""

from __future__ import annotations

import os
from typing import Any

import torch


_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_softmax.cpp")


def native_softmax(device: torch.device, dtype: torch.dtype) -> Any | None:
    """The C++ online-softmax kernels (one pass per block row instead of nine whole-block
    PyTorch ops) for fp32 blocks on a CPU with AVX-512, else None (PyTorch ops)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    from ...native import loaded

    return loaded("anyformer_cpu_softmax", _SOURCE)
