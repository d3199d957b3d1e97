"""One attention benchmark configuration, measured in its own process.

Run as `python -m anyformer.bench.attention_run '<json>'`; prints one JSON line with the time
and the peak memory of one forward (or forward + backward).

Two modes (spec key `mode`):
- `kernel` (the primary figure): the attention operation alone. q, k, v (b, h, n, d) exist
  before the measurement starts; a method that needs a materialised (n, n) mask or
  (b, h, n, n) bias (naive/eager and sdpa with a positional bias, sdpa+dense-window) builds it
  after the memory baseline is taken, so its peak memory includes that tensor; the time is
  that of the attention call with the mask already built.
- `module`: the whole attention module from x (b, n, dim), projections included.

Legend: `b` batch, `h` heads, `n` sequence length, `d` head dim, `dim` model width.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import Tensor, nn

from ..config import AttentionConfig
from ..nn.attention import ATTENTIONS, KERNELS, AttentionContext, mha_from_config
from ..nn.attention.block_bias import PositionalBlockBias
from ..nn.attention.patterns import Window
from ..nn.build_context import BuildContext
from ..nn.positional import POSITIONALS, PositionalContext


def projections_only(q: Tensor, k: Tensor, v: Tensor, **_: object) -> Tensor:
    """A kernel that returns the queries: times the projections around attention alone."""
    return q


def build_method(method: str, *, num_heads: int, head_dim: int, causal: bool, window: int) -> tuple[nn.Module, int | None]:
    """The attention module a method name stands for, and the window of a dense sliding-window
    mask it is given (or None).

    Names: `mha[KERNEL]` (multi-head attention with an exact kernel), `sdpa+dense-window` (sdpa
    given the materialised sliding-window mask), `projections` (no attention), or any
    registered attention kind with its default options (`window` for windowed kinds).
    """
    dim = num_heads * head_dim

    def context(cfg: AttentionConfig) -> BuildContext:
        return BuildContext.standalone(cfg, dim=dim, causal=causal)

    if method.startswith("mha[") and method.endswith("]"):
        cfg = AttentionConfig(kind="mha", kernel=method[4:-1], num_heads=num_heads, head_dim=head_dim)
        return ATTENTIONS.get("mha")(cfg, context(cfg)), None
    if method in ("sdpa+dense-window", "projections"):
        cfg = AttentionConfig(kind="mha", num_heads=num_heads, head_dim=head_dim)
        kernel = KERNELS.get("sdpa") if method == "sdpa+dense-window" else projections_only
        return mha_from_config(cfg, context(cfg), kernel=kernel), window if method == "sdpa+dense-window" else None
    options = {"window": window} if method in ("sliding_window", "lambda_shaped") else {}
    cfg = AttentionConfig(kind=method, num_heads=num_heads, head_dim=head_dim, options=options)
    return ATTENTIONS.get(method)(cfg, context(cfg)), None


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """The process's resident memory now (from /proc; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def window_mask(window: int, n: int, device: torch.device) -> Tensor:
    """The dense (n, n) sliding-window mask, built a few rows at a time to keep setup's peak low."""
    pattern, rows = Window(window), 1024
    mask = torch.empty(n, n, dtype=torch.bool, device=device)
    keys = torch.arange(n, device=device)
    for r0 in range(0, n, rows):
        mask[r0 : r0 + rows] = pattern.mask(torch.arange(r0, min(r0 + rows, n), device=device), keys)
    return mask


def _kernel_step(spec: dict, module: nn.Module, window: int | None, positional: nn.Module, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Kernel mode: q, k, v are made here (before the memory baseline); returns `setup`, which
    materialises what the method needs (its memory counts) and returns the step to time."""
    if spec["method"] == "projections":
        raise ValueError("method 'projections' times the projections around attention: use mode 'module'")
    n, heads, head_dim, causal = spec["n"], spec["num_heads"], spec["head_dim"], spec["causal"]
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, requires_grad=spec["backward"]) for _ in range(3))
    positions = torch.arange(n, device=device)[None]  # (b, n)
    kernel = module.kernel if hasattr(module, "kernel") else _kernelized(module, positions, positional)
    lazy = bool(getattr(module, "lazy_bias", False))

    def setup():  # type: ignore[no-untyped-def]
        mask = window_mask(window, n, device) if window is not None else None
        extra: dict = {}
        if lazy:
            if positional.bias(positions[:, :1], positions[:, :1]) is not None:
                extra["block_bias"] = PositionalBlockBias(positional, positions, positions)
        else:
            bias = positional.bias(positions, positions)  # (b, h, n, n) or None
            # an input of the kernel like q, k, v: a leaf (with a learned table, the graph to it
            # would be freed by the first backward), with its gradient when the pass has one
            extra["bias"] = None if bias is None else bias.detach().requires_grad_(spec["backward"])

        def step() -> None:
            if spec["backward"]:
                kernel(q, k, v, mask=mask, causal=causal, **extra).sum().backward()
            else:
                with torch.no_grad():
                    kernel(q, k, v, mask=mask, causal=causal, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def error() -> float | None:
            """Mean over rows of |out - exact| / |exact|, exact being SDPA on the same q, k, v
            (methods that approximate softmax attention, without a mask or bias, only)."""
            approximate = getattr(kernel, "approximates_softmax", False) or getattr(getattr(module, "features", None), "approximates_softmax", False)
            if not approximate or mask is not None or extra.get("bias") is not None or extra.get("block_bias") is not None:
                return None
            with torch.no_grad():
                out = kernel(q, k, v, causal=causal).float()
                exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
                return float(((out - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)).mean())

        step.error = error  # type: ignore[attr-defined]
        return step

    return setup


def _kernelized(module: nn.Module, positions: Tensor, positional: nn.Module):  # type: ignore[no-untyped-def]
    """The attention of a kernelized kind (linear, performer) on ready q, k, v: feature maps,
    then the chunked causal or the bidirectional form, as its module runs them."""
    from ..nn.attention.linear import causal_linear_attention, linear_attention

    def kernel(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, causal: bool = False, **_: object) -> Tensor:
        ctx = AttentionContext(q_pos=positions, k_pos=positions, positional=positional, mask=None, causal=causal)
        qn, kn, qd, kd = module.features(q, k, ctx, keep=None, cache=None)  # type: ignore[operator]
        if causal:
            return causal_linear_attention(qn, kn, v, qd, kd, chunk_size=module.chunk_size, eps=module.eps)[0]  # type: ignore[arg-type]
        return linear_attention(qn, kn, v, qd, kd, eps=module.eps)  # type: ignore[arg-type]

    return kernel


def _module_step(spec: dict, module: nn.Module, window: int | None, positional: nn.Module, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Module mode: x (b, n, dim) is made here; `setup` builds the mask (if any) and the step."""
    n, heads, head_dim = spec["n"], spec["num_heads"], spec["head_dim"]
    x = torch.randn(1, n, heads * head_dim, device=device, dtype=dtype, requires_grad=spec["backward"])  # (b, n, dim)
    positions = torch.arange(n, device=device)[None]  # (b, n)

    def setup():  # type: ignore[no-untyped-def]
        mask = window_mask(window, n, device) if window is not None else None

        def step() -> None:
            ctx = AttentionContext(q_pos=positions, k_pos=positions, positional=positional, mask=mask, causal=spec["causal"])
            if spec["backward"]:
                module(x, ctx).sum().backward()
            else:
                with torch.no_grad():
                    module(x, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return step

    return setup


def measure(spec: dict) -> dict:
    """Time and peak memory of `spec` (method, mode, n, causal, positional, backward, dtype, ...).
    The peak is the growth of resident memory (CUDA: allocated memory) over the baseline taken
    once the inputs exist; it includes a materialised mask or bias, not the inputs."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    # the C++ kernels load once per process (build, import): done here, before the memory
    # baseline and the warm-up, as a long-running process has done before its steps that
    # matter. Loaded inside the first timed step instead, later calls of this process ran
    # 20-30% slower (measured, reproducibly; the cause lies outside the kernel).
    from ..nn.attention.chunked import native_softmax

    native_softmax(device, dtype)
    heads, head_dim = spec["num_heads"], spec["head_dim"]
    module, window = build_method(spec["method"], num_heads=heads, head_dim=head_dim, causal=spec["causal"], window=spec["window"])
    module = module.to(device=device, dtype=dtype)
    pos_cls = POSITIONALS.get(spec["positional"])
    positional = pos_cls(PositionalContext(heads * head_dim, heads, head_dim, spec["n"], spec["causal"]), pos_cls.Options()).to(device)
    # kernel mode calls the attention on ready q, k, v: an exact kernel, or a kernelized kind's
    # feature maps + linear form; a kernelized kind with a logit bias (which it computes
    # quadratically) is timed as a whole module instead, and the row says so
    origin = torch.zeros(1, 1, dtype=torch.long, device=device)
    has_bias = positional.bias(origin, origin) is not None
    kernelized = not hasattr(module, "kernel")
    # a module says how it is timed (`bench_mode`): a kind whose math lives in the layer's hooks
    # (differential, selective, shaped), or one that declares nothing (a recurrent mixer), runs
    # as a whole module; the row says so
    # an encoding whose terms come from the layer's queries or probabilities (relative
    # attention) acts inside the layer, not on ready q, k, v: timed as a whole module too
    relative = bool(getattr(positional, "query_aware", False) or getattr(positional, "value_aware", False))
    mode = ("module" if getattr(module, "bench_mode", "module") == "module" or (kernelized and has_bias) or relative
            else spec.get("mode", "kernel"))
    make = _module_step if mode == "module" else _kernel_step
    setup = make(spec, module, window, positional, device, dtype)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
    step = setup()
    t0 = time.perf_counter()
    step()
    times = [time.perf_counter() - t0]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    # the first call is a warm-up (first-touch page faults, thread pool start-up) and is never
    # the reported time: at least one more call follows, then more until min_time has passed
    while len(times) < 2 or (sum(times) < spec["min_time"] and len(times) < spec["repeats"] + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    best = min(times[1:]) if len(times) > 1 else times[0]
    result = {"time_s": best, "peak_bytes": max(peak, 0), "runs": len(times), "mode": mode, "call_times_s": [round(t, 6) for t in times]}
    error = getattr(step, "error", None)
    if error is not None and not spec["backward"] and (value := error()) is not None:
        result["rel_error"] = value  # measured after the peak and the times: it counts in neither
    return result


if __name__ == "__main__":
    from ..plugins import from_environment

    from_environment()  # the variants of the plugins the parent process imported (ANYFORMER_PLUGINS)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
