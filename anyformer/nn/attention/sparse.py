"""Sparse attention kinds: multi-head attention restricted to a fixed sparsity pattern and
computed block-sparsely by the chunked kernel, so empty blocks cost nothing.

Each kind is chosen through config, e.g. `model.attention.kind=sliding_window` with
`model.attention.options.window=256`. Patterns act on indices in key coordinates, so with a KV
cache the new queries are the last n positions and decoding with a cache matches decoding
without one. Causality (decoders) is applied on top of the pattern.

Common options: `dense` computes the same pattern as a dense (n, m) mask through
`model.attention.kernel` instead (a reference, or faster for short sequences); `q_block` and
`k_block` override the block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ...config import AttentionConfig, ConfigError, parse_options
from ..build_context import BuildContext
from .chunked import ChunkedKernel
from .kernels import Kernel
from .mha import mha_from_config
from .registry import ATTENTIONS, KERNELS
from .masks import combine_masks
from .patterns import BlockLocal, Dilated, Fixed, LambdaShaped, Pattern, Strided, Window


class DensePatternKernel:
    """An exact kernel with a pattern's whole (n, m) mask folded into its mask (reference path)."""

    def __init__(self, pattern: Pattern, kernel: Kernel) -> None:
        self.pattern, self.kernel = pattern, kernel

    def keys_per_query(self, n: int, m: int, causal: bool) -> float:
        """The wrapped exact kernel scores every key (the pattern only masks): all m, half
        of them under a causal mask."""
        return m / 2 if causal else float(m)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, **kwargs: object) -> Tensor:
        """q (b, h, n, d), k/v (b, g, m, d) -> (b, h, n, d); other arguments as the wrapped kernel."""
        dense = self.pattern.dense(q.shape[2], k.shape[2], q.device)
        return self.kernel(q, k, v, mask=combine_masks(mask, dense), **kwargs)  # type: ignore[arg-type]

    def weights(self, q: Tensor, k: Tensor, *, mask: Tensor | None = None, **kwargs: object) -> Tensor:
        """The dense attention probabilities under the pattern."""
        return ChunkedKernel(self.pattern).weights(q, k, mask=mask, **kwargs)  # type: ignore[arg-type]


def _positive(where: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"model.attention.options.{name} for '{where}' must be >= 1, got {value}")


@dataclass
class SparseOptions:
    """Options every sparse kind shares."""

    dense: bool = False
    q_block: int | None = None
    k_block: int | None = None

    def __post_init__(self) -> None:
        for name in ("q_block", "k_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.attention.options.{name} must be >= 1 (or unset), got {value}")


@dataclass
class SlidingWindowOptions(SparseOptions):
    """`window`: keys with |i - j| < window (window - 1 back plus the query, when causal)."""

    window: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("sliding_window", window=self.window)


@dataclass
class StridedOptions(SparseOptions):
    """`stride`: the previous stride keys plus every stride-th key."""

    stride: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("strided", stride=self.stride)


@dataclass
class FixedOptions(SparseOptions):
    """`stride`: block length l; `num_summary`: the last c keys of each block every query sees."""

    stride: int = 128
    num_summary: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("fixed", stride=self.stride, num_summary=self.num_summary)
        if self.num_summary > self.stride:
            raise ConfigError(f"model.attention.options.num_summary ({self.num_summary}) must be <= stride ({self.stride})")


@dataclass
class BlockLocalOptions(SparseOptions):
    """`block`: length of the blocks that attend only within themselves."""

    block: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("block_local", block=self.block)


@dataclass
class DilatedOptions(SparseOptions):
    """`window` keys on each side, `dilation` positions apart."""

    window: int = 128
    dilation: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("dilated", window=self.window, dilation=self.dilation)


@dataclass
class LambdaShapedOptions(SparseOptions):
    """`num_global` first keys every query sees, plus a sliding `window`."""

    window: int = 256
    num_global: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("lambda_shaped", window=self.window)
        if self.num_global < 0:
            raise ConfigError(f"model.attention.options.num_global must be >= 0, got {self.num_global}")


def _register(name: str, options_cls: type[SparseOptions], make: Callable[..., Pattern], doc: str) -> None:
    def factory(cfg: AttentionConfig, ctx: BuildContext) -> nn.Module:
        opts = parse_options(options_cls, cfg.options, f"model.attention.options ({name})")
        pattern = make(opts)
        if opts.dense:
            kernel = DensePatternKernel(pattern, KERNELS.get(cfg.kernel))
        else:
            kernel = ChunkedKernel(pattern, q_block=opts.q_block, k_block=opts.k_block)
        return mha_from_config(cfg, ctx, kernel=kernel)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = doc
    factory.position_dependent = True  # type: ignore[attr-defined]  # the pattern follows token indices
    ATTENTIONS.register(name)(factory)


_register(
    "sliding_window", SlidingWindowOptions, lambda o: Window(o.window),
    "Sliding-window (banded) attention (Beltagy et al. 2020, Longformer; Child et al. 2019).",
)
_register(
    "strided", StridedOptions, lambda o: Strided(o.stride),
    "Sparse Transformer strided pattern, both factors in one head (Child et al. 2019).",
)
_register(
    "fixed", FixedOptions, lambda o: Fixed(o.stride, o.num_summary),
    "Sparse Transformer fixed pattern, both factors in one head (Child et al. 2019).",
)
_register(
    "block_local", BlockLocalOptions, lambda o: BlockLocal(o.block),
    "Block-local attention: each query attends within its own block (Parmar et al. 2018).",
)
_register(
    "dilated", DilatedOptions, lambda o: Dilated(o.window, o.dilation),
    "Dilated sliding window (Beltagy et al. 2020, Longformer).",
)
_register(
    "lambda_shaped", LambdaShapedOptions, lambda o: LambdaShaped(o.window, o.num_global),
    "Λ-shaped attention: global first tokens plus a local window (Han et al. 2023; Xiao et al. 2023).",
)
