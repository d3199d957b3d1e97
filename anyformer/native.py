"""The library's small C++ CPU kernels, built on first use.

Each kernel is one .cpp file shipped inside the package and compiled with the PyTorch C++
extension tools the first time it is needed (tens of seconds). The build is cached under
$ANYFORMER_CACHE/native (default ~/.cache/anyformer/native), keyed by the source's contents:
every checkout of the same code shares it. A build folder another process holds locked is
waited for up to ANYFORMER_NATIVE_LOCK_TIMEOUT seconds (default 600), then given up with a
message naming the lock file. Its module exposes `supported()`, which checks at run time that
this CPU has the instructions the kernel was written for (AVX-512, with BF16 dot products).

Where a kernel cannot be built (no C++ compiler, missing headers) or the CPU lacks those
instructions, `load` returns None after one warning, and every caller keeps a pure PyTorch
path that computes the same thing. A failed build is remembered across processes (a marker
file under $ANYFORMER_CACHE, default ~/.cache/anyformer/native, named after the source's
hash): later processes take the PyTorch path at once, without retrying the build or warning
again. Delete the marker (its path is in the warning) to retry, e.g. after installing a
compiler; a changed source has a new hash and is tried afresh.

With ANYFORMER_REQUIRE_NATIVE=1 (set by the CI script, on machines that have a compiler and the
instructions) a kernel that does not build or cannot run raises instead, and remembered
failures are retried: the test suite cannot pass with its C++ kernels broken.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from typing import Any

_MODULES: dict[str, Any] = {}


class NativeKernelError(RuntimeError):
    """A C++ kernel that must be available (ANYFORMER_REQUIRE_NATIVE) is not."""
_MISSING = object()


def _local_files(source: str) -> list[str]:
    """`source` and the local headers it includes (`#include "x.h"`, resolved next to the file
    that includes it, recursively), as absolute paths, `source` first."""
    todo, seen = [os.path.abspath(source)], []
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.append(path)
        with open(path, "rb") as f:
            text = f.read()
        for inc in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), inc.decode())))
    return seen


def _fingerprint(source: str) -> str:
    """A short hash of the contents of `source` and its local headers (their names relative to
    it, not where the checkout is), so a change in either builds a fresh module."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(source))
    for path in _local_files(source):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:10]


def _cache_root() -> str:
    return os.environ.get("ANYFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "anyformer")


def build_paths(source: str, build_name: str) -> tuple[str, str]:
    """(source to compile, build folder) of `build_name`: the source and its headers copied into
    a folder named after their contents under $ANYFORMER_CACHE/native, so every checkout of the
    same code compiles the same paths and shares one build (the build tool sees nothing changed)
    instead of rebuilding over another checkout's."""
    native = os.path.join(_cache_root(), "native")
    src_dir, build_dir = os.path.join(native, "src", build_name), os.path.join(native, "build", build_name)
    root = os.path.dirname(os.path.abspath(source))
    for path in _local_files(source):
        target = os.path.join(src_dir, os.path.relpath(path, root))
        if not os.path.exists(target):  # the folder's name is its contents' hash: a present file is the same
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(path, "rb") as f_in, open(tmp, "wb") as f_out:
                f_out.write(f_in.read())
            os.replace(tmp, target)
    os.makedirs(build_dir, exist_ok=True)
    return os.path.join(src_dir, os.path.basename(source)), build_dir


def lock_timeout() -> float:
    """Seconds to wait for another process's build of the same kernel
    (ANYFORMER_NATIVE_LOCK_TIMEOUT, default 600)."""
    try:
        return float(os.environ.get("ANYFORMER_NATIVE_LOCK_TIMEOUT", "600"))
    except ValueError:
        return 600.0


def wait_for_lock(build_dir: str, timeout: float) -> None:
    """Return once no build holds the lock of `build_dir`; raise BuildLocked when its lock file
    has stood for `timeout` seconds (a build that takes that long, or one that crashed and
    left it behind)."""
    lock = os.path.join(build_dir, "lock")
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return
        if age >= timeout:
            raise BuildLocked(f"its build folder has been locked for {age:.0f} s by {lock} (another process building it, "
                              "or a build that was killed); if no build is running, delete that file to build again")
        time.sleep(min(1.0, max(0.05, timeout - age)))


class BuildLocked(RuntimeError):
    """A kernel's build folder stays locked past the timeout."""


def failure_marker(build_name: str) -> str:
    """The file that records a failed build of `build_name` (name plus source hash)."""
    return os.path.join(_cache_root(), "native", f"{build_name}.failed")


def _remember_failure(build_name: str, err: BaseException) -> str | None:
    marker = failure_marker(build_name)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"{type(err).__name__}: {err}\n")
        return marker
    except OSError:  # a read-only home: the failure is remembered for this process only
        return None


def load(name: str, source: str) -> Any | None:
    """The compiled module `name` built from `source` (a path), or None where it cannot run here.
    Built once per process; later calls return the same module (or None) at once."""
    if name not in _MODULES:
        module = None
        if os.environ.get("ANYFORMER_NO_NATIVE"):  # lets users (and tests) force the PyTorch paths
            _MODULES[name] = None
            return None
        build_name = f"{name}_{_fingerprint(source)}"
        require = bool(os.environ.get("ANYFORMER_REQUIRE_NATIVE"))
        if os.path.exists(failure_marker(build_name)) and not require:  # failed in an earlier process: do not retry
            _MODULES[name] = None
            return None
        try:
            staged, build_dir = build_paths(source, build_name)
            wait_for_lock(build_dir, lock_timeout())
        except (OSError, BuildLocked) as err:  # a read-only cache or a stuck lock: this process goes without
            if require:
                raise NativeKernelError(f"C++ kernel {name} cannot be built and ANYFORMER_REQUIRE_NATIVE is set: {err}") from err
            warnings.warn(f"C++ kernel {name} unavailable: {err}; using the PyTorch path")
            _MODULES[name] = None
            return None
        try:
            from torch.utils import cpp_extension

            module = cpp_extension.load(name=build_name, sources=[staged], extra_cflags=["-O3", "-fopenmp"],
                                        extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=False)
            if not module.supported():
                if require:
                    raise NativeKernelError(f"C++ kernel {name} built, but this CPU lacks the instructions it needs "
                                            "(AVX-512 with BF16), and ANYFORMER_REQUIRE_NATIVE is set")
                module = None
        except NativeKernelError:
            raise
        except Exception as err:  # no toolchain / headers: the caller's PyTorch path takes over
            if require:
                raise NativeKernelError(f"C++ kernel {name} ({source}) failed to build and ANYFORMER_REQUIRE_NATIVE "
                                        f"is set: {type(err).__name__}: {err}") from err
            marker = _remember_failure(build_name, err)
            where = f"; remembered in {marker} (delete it to retry)" if marker else ""
            warnings.warn(f"C++ kernel {name} unavailable ({type(err).__name__}: {str(err)[:200]}); using the PyTorch path{where}")
            module = None
        if module is not None:
            _register_fakes(name)
        _MODULES[name] = module
    return _MODULES[name]


# Output shapes of each module's torch.ops.anyformer operators for tracing (torch.compile runs
# them on fake tensors first): allocated like the C++ code allocates them.
_FAKES: dict[str, dict[str, Any]] = {
    "anyformer_cpu_decode": {
        "anyformer::gemv": lambda x, weight, bias=None: x.new_empty(weight.shape[0]),
        "anyformer::gemv_multi": lambda x, weights, biases: x.new_empty(sum(w.shape[0] for w in weights)),
    },
    "anyformer_cpu_softmax": {
        "anyformer::decode_attention": lambda q, k, v, scale: q.new_empty(q.shape),
    },
}
_FAKES_DONE: set[str] = set()


def _register_fakes(name: str) -> None:
    import torch

    for op, fake in _FAKES.get(name, {}).items():
        if op not in _FAKES_DONE:
            torch.library.register_fake(op)(fake)
            _FAKES_DONE.add(op)


def loaded(name: str, source: str) -> Any | None:
    """`load(name, source)`, with a plain dictionary lookup once the module is loaded (for
    callers on a per-step path)."""
    module = _MODULES.get(name, _MISSING)
    return load(name, source) if module is _MISSING else module


_DECODE_SOURCE = os.path.join(os.path.dirname(__file__), "generation", "cpu_decode.cpp")


def decode_kernels() -> Any | None:
    """The decoding kernels (cpu_decode.cpp: `gemv`, `gemv_multi`), built on first
    use; None where they cannot run here. Called per decoding step: a dictionary lookup once loaded."""
    return loaded("anyformer_cpu_decode", _DECODE_SOURCE)
