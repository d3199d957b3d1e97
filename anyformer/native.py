"""The library's small C++ CPU kernels, built on first use.

Each kernel is one .cpp file shipped inside the package and compiled with the PyTorch C++
extension tools the first time it is needed (tens of seconds; cached per machine under
~/.cache/torch_extensions). Its module exposes `supported()`, which checks at run time that
this CPU has the instructions the kernel was written for (AVX-512, with BF16 dot products).

Where a kernel cannot be built (no C++ compiler, missing headers) or the CPU lacks those
instructions, `load` returns None after one warning, and every caller keeps a pure PyTorch
path that computes the same thing.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any

_MODULES: dict[str, Any] = {}


def _fingerprint(source: str) -> str:
    """A short hash of `source` and the local headers it includes (`#include "x.h"`, resolved
    next to it), so that a change in either builds a fresh module instead of reusing a stale one."""
    digest = hashlib.sha256()
    todo, seen = [os.path.abspath(source)], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(path, "rb") as f:
            text = f.read()
        digest.update(text)
        for inc in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), inc.decode())))
    return digest.hexdigest()[:10]


def load(name: str, source: str) -> Any | None:
    """The compiled module `name` built from `source` (a path), or None where it cannot run here.
    Built once per process; later calls return the same module (or None) at once."""
    if name not in _MODULES:
        module = None
        if os.environ.get("ANYFORMER_NO_NATIVE"):  # lets users (and tests) force the PyTorch paths
            _MODULES[name] = None
            return None
        try:
            from torch.utils import cpp_extension

            module = cpp_extension.load(name=f"{name}_{_fingerprint(source)}", sources=[source], extra_cflags=["-O3", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], verbose=False)
            if not module.supported():
                module = None
        except Exception as err:  # no toolchain / headers: the caller's PyTorch path takes over
            warnings.warn(f"C++ kernel {name} unavailable ({type(err).__name__}: {str(err)[:200]}); using the PyTorch path")
            module = None
        _MODULES[name] = module
    return _MODULES[name]


def decode_kernels() -> Any | None:
    """The decoding kernels (cpu_decode.cpp: `gemv`, `gemv_multi`, `Decoder`), built on first
    use; None where they cannot run here."""
    return load("anyformer_cpu_decode", os.path.join(os.path.dirname(__file__), "generation", "cpu_decode.cpp"))
