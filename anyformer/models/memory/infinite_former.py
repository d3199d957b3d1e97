"""∞-former (Martins et al. 2022): an unbounded long-term memory as a continuous signal, read by
continuous attention, beside the ordinary attention over the current segment.

Legend: `b` batch, `n` queries of a segment, `s` segment length, `d` width, `N` basis functions,
`L` points fitted, `H` heads, `e` head width.

The input is read in segments of `segment_len` tokens. Each self-attention layer keeps a
long-term memory of the inputs it saw in earlier segments as a signal over t in [0, 1]:

    x(t) = B^T psi(t),   psi_j(t) = Normal(t; c_j, w^2)   (N Gaussian basis functions, centres
                                                          c_j evenly over [0, 1], width w = 1/N)
    B = (F F^T + ridge I)^-1 F X      (ridge regression of the L states X (L, d) at positions
                                       t_1..t_L, F[j, i] = psi_j(t_i))

so the memory is N x d numbers per layer, whatever the length read. When a segment ends, the
old signal is contracted into [0, old_fraction]: it is sampled at `samples` points (evenly, or
with `sticky`, where the segment's attention densities were highest), those samples and the
segment's s states (spread over (old_fraction, 1]) are fitted again.

Continuous attention (per layer and head): keys K = B W_K and values V = B W_V (N, e); a query
q = W_Q x gives scores K q / sqrt(e) (N,), from which a Gaussian density over t is predicted,
mu = sigmoid(w_mu . scores), sigma^2 = softplus(w_sigma . scores) + 1/N^2, and the read is the
expected value E_p[v(t)] = V^T E_p[psi(t)], with E_p[psi_j(t)] = Normal(mu; c_j, sigma^2 + w^2)
in closed form. The heads' reads, projected by W_O (zero at initialisation, so an untrained
memory changes nothing), are added to the layer's ordinary attention output.

The wrapped model is unchanged; the memory branch hooks its self-attention modules (inputs
captured, outputs added to). The first segment, with an empty memory, is the plain model's.
Memories are not backpropagated through (each segment's update is detached). Decoding keeps
the wrapped model's cache for the current segment and each layer's memory; when a segment is
full its states update the memories and the cache is cleared: constant time and memory per
token, however long the text.

Options (`model.memory.options`): segment_len (128), num_basis (64), ridge (0.1),
old_fraction (0.5), samples (None: num_basis), sticky (false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError, ModelConfig, parse_options
from ...nn.attention.mha import MultiHeadAttention
from ..registry import MEMORIES
from .segmented import SegmentCache, SegmentedDecoder

GRID = 512  # points of [0, 1] on which sticky sampling reads the attention densities


@dataclass
class InfiniteFormerOptions:
    """segment_len: tokens per segment; num_basis: N, the memory's size per layer; ridge: the
    regression's penalty; old_fraction: share of [0, 1] the old memory is contracted into;
    samples: points at which the old signal is sampled when contracted (None: num_basis);
    sticky: sample them where the last segment's attention was, instead of evenly."""

    segment_len: int = 128
    num_basis: int = 64
    ridge: float = 0.1
    old_fraction: float = 0.5
    samples: int | None = None
    sticky: bool = False


def basis(t: Tensor, num_basis: int) -> Tensor:
    """psi (N, L) of the N Gaussian basis functions at positions t (L,)."""
    centres = torch.linspace(0.0, 1.0, num_basis, dtype=t.dtype, device=t.device)
    width = 1.0 / num_basis
    z = (t[None, :] - centres[:, None]) / width
    return torch.exp(-0.5 * z**2) / (width * math.sqrt(2 * math.pi))


def fit(states: Tensor, t: Tensor, num_basis: int, ridge: float) -> Tensor:
    """B (b, N, d) of the ridge regression of states (b, L, d) at positions t (L,) onto the basis."""
    f = basis(t.double(), num_basis)  # (N, L)
    gram = f @ f.T + ridge * torch.eye(num_basis, dtype=f.dtype, device=f.device)
    solve = torch.linalg.solve(gram, f)  # (N, L): (F F^T + ridge I)^-1 F
    return torch.einsum("nl,bld->bnd", solve.to(states.dtype), states)


def expected_basis(mu: Tensor, var: Tensor, num_basis: int) -> Tensor:
    """E_p[psi_j(t)] (..., N) for Gaussian densities p = Normal(mu, var) (mu, var: (...,))."""
    centres = torch.linspace(0.0, 1.0, num_basis, dtype=mu.dtype, device=mu.device)
    total = var[..., None] + (1.0 / num_basis) ** 2
    return torch.exp(-0.5 * (mu[..., None] - centres) ** 2 / total) / torch.sqrt(2 * math.pi * total)


def density(t: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """Normal(t; mu, var) for positions t (G,) and densities (...,) -> (..., G)."""
    return torch.exp(-0.5 * (t - mu[..., None]) ** 2 / var[..., None]) / torch.sqrt(2 * math.pi * var[..., None])


class LongTermMemory(nn.Module):
    """One self-attention layer's continuous memory: its projections and density predictors."""

    def __init__(self, dim: int, heads: int, num_basis: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.num_basis = heads, dim // heads, num_basis
        self.q, self.k, self.v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.w_mu = nn.Parameter(torch.zeros(heads, num_basis))
        self.w_var = nn.Parameter(torch.zeros(heads, num_basis))

    def densities(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries' densities over t, mu and var (b, H, n), and the values (b, H, N, e)."""
        b, n, _ = x.shape
        h, e = self.heads, self.head_dim
        q = self.q(x).view(b, n, h, e).transpose(1, 2)  # (b, H, n, e)
        k = self.k(memory).view(b, -1, h, e).transpose(1, 2)  # (b, H, N, e)
        v = self.v(memory).view(b, -1, h, e).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(e)  # (b, H, n, N)
        mu = torch.sigmoid((scores * self.w_mu[None, :, None]).sum(-1))
        var = F.softplus((scores * self.w_var[None, :, None]).sum(-1)) + 1.0 / self.num_basis**2
        return mu, var, v

    def forward(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, n, d) reading memory B (b, N, d) -> (output (b, n, d), mu, var (b, H, n))."""
        mu, var, v = self.densities(x, memory)
        weights = expected_basis(mu.float(), var.float(), self.num_basis).to(v.dtype)  # (b, H, n, N)
        read = (weights @ v).transpose(1, 2).reshape(x.shape)  # (b, n, d)
        return self.out(read), mu, var


class InfiniteFormerCache(SegmentCache):
    """Decoding state: the wrapped decoder's cache of the current segment, the memories, and the
    states and densities gathered in the segment so far."""

    def __init__(self, make_inner: Callable[[], nn.Module], layers: int) -> None:
        super().__init__(make_inner)
        self.memories: list[Tensor | None] = [None] * layers

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        self.memories = [None if m is None else m.index_select(0, index) for m in self.memories]


class InfiniteFormer(SegmentedDecoder):
    """A decoder read in segments with a continuous long-term memory per attention layer."""

    what = "the ∞-former"

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        o = parse_options(InfiniteFormerOptions, cfg.memory.options, "model.memory.options (infinite_former)")
        checks = [
            (bool(getattr(model, "causal", False)) and hasattr(model, "lm_head"),
             f"model.memory.kind=infinite_former wraps a decoder (arch 'decoder'); got arch {cfg.arch!r}"),
            (o.segment_len >= 1, f"model.memory.options.segment_len must be >= 1, got {o.segment_len}"),
            (o.num_basis >= 1, f"model.memory.options.num_basis (the memory's size) must be >= 1, got {o.num_basis}"),
            (o.samples is None or o.samples >= 1, f"model.memory.options.samples must be >= 1 or null, got {o.samples}"),
            (o.ridge > 0, f"model.memory.options.ridge must be > 0, got {o.ridge}"),
            (0 < o.old_fraction < 1, f"model.memory.options.old_fraction must be in (0, 1), got {o.old_fraction}"),
            (o.segment_len <= cfg.max_seq_len, f"model.memory.options.segment_len={o.segment_len} exceeds model.max_seq_len={cfg.max_seq_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.inner, self.config, self.options = model, cfg, o
        self.attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        self.memories = nn.ModuleList(LongTermMemory(cfg.dim, cfg.attention.num_heads, o.num_basis) for _ in self.attention)
        self._state: dict[str, Any] | None = None  # set while a segment runs: memories in, states and densities out
        for i, layer in enumerate(self.attention):
            layer.register_forward_hook(self._hook(i))

    def reset_extra_parameters(self) -> None:
        for m in self.memories:
            nn.init.zeros_(m.out.weight)  # an untrained memory adds nothing: the plain model

    def _hook(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            state = self._state
            if state is None:
                return None
            x = args[0]
            state["inputs"][i].append(x.detach())
            memory = state["memories"][i]
            if memory is None:
                return None
            read, mu, var = self.memories[i](x, memory.to(x.dtype))
            state["densities"][i].append((mu.detach(), var.detach()))
            return output + read
        return hook

    def _run(self, memories: list[Tensor | None], fn: Callable[[], Tensor]) -> tuple[Tensor, dict[str, Any]]:
        layers = len(self.attention)
        self._state = {"memories": memories, "inputs": [[] for _ in range(layers)], "densities": [[] for _ in range(layers)]}
        try:
            out = fn()
        finally:
            state, self._state = self._state, None
        return out, state

    def _sample_points(self, densities: list[tuple[Tensor, Tensor]], b: int, device: torch.device) -> Tensor:
        """Positions (b, M) in [0, 1] at which the old signal is sampled: evenly, or (sticky)
        the quantiles of the mean attention density of the segment's queries (plus a uniform floor)."""
        o = self.options
        m = o.samples or o.num_basis
        even = ((torch.arange(m, device=device, dtype=torch.float64) + 0.5) / m).expand(b, m)
        if not o.sticky or not densities:
            return even
        grid = (torch.arange(GRID, device=device, dtype=torch.float64) + 0.5) / GRID
        mu = torch.cat([d[0] for d in densities], -1).double()  # (b, H, n_total)
        var = torch.cat([d[1] for d in densities], -1).double()
        mass = density(grid, mu, var).mean((1, 2)) + 1.0  # (b, GRID): the densities' mean plus a floor
        cdf = mass.cumsum(-1) / mass.sum(-1, keepdim=True)
        idx = torch.searchsorted(cdf, even.contiguous()).clamp(max=GRID - 1)
        return grid[idx]

    def _update(self, memory: Tensor | None, states: Tensor, densities: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The memory (b, N, d) after a segment's states (b, s, d), contracting the old one."""
        o = self.options
        b, s, _ = states.shape
        new_t = (torch.arange(s, device=states.device, dtype=torch.float64) + 0.5) / s
        if memory is None:
            return fit(states.float(), new_t, o.num_basis, o.ridge)
        points = self._sample_points(densities, b, states.device)  # (b, M)
        old = torch.einsum("bnm,bnd->bmd", torch.stack([basis(p, o.num_basis) for p in points]).to(memory.dtype), memory)
        t = torch.cat([o.old_fraction * points[0], o.old_fraction + (1 - o.old_fraction) * new_t])
        if o.sticky:  # rows sample different points: fit each row on its own
            return torch.cat([
                fit(torch.cat([old[r : r + 1], states[r : r + 1].float()], 1),
                    torch.cat([o.old_fraction * points[r], o.old_fraction + (1 - o.old_fraction) * new_t]), o.num_basis, o.ridge)
                for r in range(b)
            ])
        return fit(torch.cat([old, states.float()], 1), t, o.num_basis, o.ridge)

    def _end_segment(self, memories: list[Tensor | None], state: dict[str, Any]) -> list[Tensor | None]:
        return [self._update(memories[i], torch.cat(state["inputs"][i], 1), state["densities"][i]) for i in range(len(memories))]

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """tokens (b, N) of any length -> logits (b, N, V)."""
        self.check_rows(tokens, attention_mask)
        s = self.options.segment_len
        memories: list[Tensor | None] = [None] * len(self.attention)
        outs = []
        for start in range(0, tokens.shape[1], s):
            seg = tokens[:, start : start + s]
            logits, state = self._run(memories, lambda: self.inner(seg))
            outs.append(logits)
            if start + s < tokens.shape[1]:
                memories = self._end_segment(memories, state)
        return torch.cat(outs, 1)

    def memory_size(self, memories: list[Tensor | None]) -> int:
        """Numbers held by the memories (constant once the first segment is read)."""
        return sum(0 if m is None else m.numel() for m in memories)

    # --- the model protocol (anyformer.protocol) ---

    def make_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, window: int | None = None, **kwargs: Any) -> InfiniteFormerCache:
        self.check_decoding(window=window)
        s = self.options.segment_len
        cache = InfiniteFormerCache(lambda: self.inner.make_cache(batch, s, dtype=dtype, device=device), len(self.attention))  # type: ignore[operator]
        cache.pending = {"inputs": [[] for _ in self.attention], "densities": [[] for _ in self.attention]}  # type: ignore[attr-defined]
        return cache

    def decode_step(self, tokens: Tensor, cache: InfiniteFormerCache, positions: Tensor, *, attention_mask: Tensor | None = None,
                    source: Any = None, last_only: bool = False) -> Tensor:
        """(b, n) tokens -> logits (b, n, V); a full segment updates the memories."""
        self.check_decoding(attention_mask)
        s = self.options.segment_len
        outs, i, n = [], 0, tokens.shape[1]
        pending = cache.pending  # type: ignore[attr-defined]
        while i < n:
            take = min(n - i, s - cache.filled)
            chunk = tokens[:, i : i + take]
            logits, state = self._run(cache.memories, lambda: self.inner.decode_step(chunk, cache.inner, cache.inner.next_positions(
                torch.ones_like(chunk, dtype=torch.bool))))  # type: ignore[operator]
            outs.append(logits)
            for layer in range(len(self.attention)):
                pending["inputs"][layer] += state["inputs"][layer]
                pending["densities"][layer] += state["densities"][layer]
            cache.filled += take
            cache.length += take
            i += take
            if cache.filled == s:
                cache.memories = self._end_segment(cache.memories, pending)
                pending["inputs"] = [[] for _ in self.attention]
                pending["densities"] = [[] for _ in self.attention]
                cache.inner, cache.filled = cache.make_inner(), 0
        return outs[-1][:, -1:] if last_only else torch.cat(outs, 1)


@MEMORIES.register("infinite_former")
def build_infinite_former(model: nn.Module, cfg: ModelConfig) -> InfiniteFormer:
    """A continuous long-term memory per attention layer (∞-former)."""
    return InfiniteFormer(model, cfg)
