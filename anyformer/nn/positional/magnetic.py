"""Direction-aware positional encoding of a directed graph over the tokens: eigenvectors of the
magnetic Laplacian (Geisler et al. 2023, "Transformers Meet Directed Graphs").

Legend: `b` batch, `n` tokens (graph nodes), `k` eigenvectors, `d` width.

The graph is the attention mask the user passes (`attn_mask`): query i attending key j is the
directed edge j -> i (information flows from j to i). With A[u, v] = 1 for an edge u -> v,

    A_s = A or A^T (symmetrised),  Theta[u, v] = 2 pi q (A[u, v] - A[v, u]),
    H = A_s * exp(i Theta),        L_q = I - D_s^-1/2 H D_s^-1/2,

a Hermitian matrix (real eigenvalues) whose eigenvectors carry the edge directions in their
phases; q = 0 gives the symmetric normalised Laplacian of the undirected graph. The `k`
eigenvectors of the smallest eigenvalues, each with its phase fixed (its largest-magnitude entry
made real and positive), give every node 2k real features (real and imaginary parts) that a
learned linear map turns into a d-vector added to the token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...config import ConfigError
from .base import POSITIONALS, PositionalContext, PositionalEncoding


def graph_adjacency(graph: Tensor, n: int) -> Tensor:
    """A user attention mask (bool or additive float; (n, n), (b, n, n) or (b, h, n, n)) as the
    adjacency (b, n, n) with A[u, v] = 1 for the edge u -> v (key u feeds query v), self-loops
    removed."""
    g = graph if graph.dtype == torch.bool else torch.isfinite(graph) & (graph > -1e30)
    if g.dim() == 4:
        g = g[:, 0]  # the graph is the same for every head
    if g.dim() == 2:
        g = g[None]
    if g.shape[-2:] != (n, n):
        raise ValueError(
            f"the magnetic positional encoding reads the attention mask as a graph over the {n} tokens; "
            f"got a mask of shape {tuple(graph.shape)}. Pass attn_mask of shape (n, n), (b, n, n) or (b, 1, n, n)"
        )
    adj = g.transpose(-1, -2).to(torch.float64)  # mask[i, j] (i attends j) is the edge j -> i
    return adj * (1 - torch.eye(n, dtype=adj.dtype, device=adj.device))


def magnetic_laplacian(adj: Tensor, q: float) -> Tensor:
    """The normalised magnetic Laplacian (b, n, n), complex128, of adjacency (b, n, n) (A[u, v] = 1
    for u -> v) with potential q; isolated nodes get a zero row and column (plus the identity)."""
    sym = ((adj + adj.transpose(-1, -2)) > 0).to(torch.float64)  # A_s
    theta = 2 * math.pi * q * (adj - adj.transpose(-1, -2))
    h = sym * torch.exp(1j * theta)  # (b, n, n) Hermitian
    deg = sym.sum(-1)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    eye = torch.eye(adj.shape[-1], dtype=torch.complex128, device=adj.device)
    return eye - inv_sqrt[..., :, None] * h * inv_sqrt[..., None, :]


def magnetic_eigenvectors(adj: Tensor, q: float, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest eigenvalues (b, k) and their eigenvectors (b, n, k) of the magnetic
    Laplacian, each eigenvector's phase fixed so its largest-magnitude entry (the first one, up
    to 1e-6) is real and positive; zero-padded when the graph has fewer than k nodes. Isolated
    nodes come last (their eigenvalue is given as 3 instead of 1)."""
    lap = magnetic_laplacian(adj, q)
    # isolated nodes (the padding of a batch of graphs) are moved to eigenvalue 3, past the [0, 2]
    # spectrum of the rest, so their indicator vectors never take one of the k slots ahead of the
    # graph's own eigenvectors: padding a graph with isolated nodes leaves its encoding unchanged
    isolated = ((adj + adj.transpose(-1, -2)) == 0).all(-1)  # (b, n)
    vals, vecs = torch.linalg.eigh(lap + torch.diag_embed(2.0 * isolated.to(lap.dtype)))  # ascending
    vals, vecs = vals[..., :k], vecs[..., :k]
    mag = vecs.abs()
    # the pivot is the FIRST entry within 1e-6 of the largest magnitude: a plain argmax picks among
    # tied entries (symmetric parts of a graph) by rounding noise, and the phase then flips
    top = (mag >= mag.amax(-2, keepdim=True) - 1e-6).to(torch.int8).argmax(-2, keepdim=True)  # (b, 1, k)
    pivot = vecs.gather(-2, top)
    vecs = vecs * (pivot.conj() / pivot.abs().clamp(min=1e-30))
    pad = k - vecs.shape[-1]
    if pad > 0:
        vals = torch.nn.functional.pad(vals, (0, pad))
        vecs = torch.nn.functional.pad(vecs, (0, pad))
    return vals, vecs


@POSITIONALS.register("magnetic")
class MagneticLaplacian(PositionalEncoding):
    """Node positions from the magnetic Laplacian of the attention graph (`attn_mask`).

    Options: `q` the potential (0: undirected Laplacian; the paper uses about 1 / (4 x the
    number of nodes) or a small constant such as 0.25), `k` eigenvectors kept.
    """

    needs_graph = True  # the encoding exists only for a given attention graph (attn_mask)

    @dataclass
    class Options:
        q: float = 0.25
        k: int = 8

    def __init__(self, ctx: PositionalContext, options: "MagneticLaplacian.Options") -> None:
        super().__init__(ctx, options)
        if options.k < 1:
            raise ConfigError(f"model.positional.options.k for 'magnetic' must be >= 1, got {options.k}")
        if not 0.0 <= options.q <= 0.5:
            raise ConfigError(f"model.positional.options.q for 'magnetic' must be in [0, 0.5], got {options.q}")
        self.proj = nn.Linear(2 * options.k, ctx.dim)

    def features(self, graph: Tensor, n: int) -> Tensor:
        """(b, n, 2k) real node features (real then imaginary parts of the eigenvectors)."""
        _, vecs = magnetic_eigenvectors(graph_adjacency(graph, n), self.options.q, self.options.k)
        return torch.cat([vecs.real, vecs.imag], -1)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        raise ValueError(
            "positional kind 'magnetic' encodes the graph given as attn_mask (bool, True = query i attends key j); "
            "call the model with attn_mask=..., or choose another model.positional.kind"
        )

    def embed_graph(self, x: Tensor, positions: Tensor, graph: Tensor | None) -> Tensor:
        if graph is None:
            return self.embed(x, positions)
        feats = self.features(graph.to(x.device), x.shape[1]).to(self.proj.weight.dtype)  # (b or 1, n, 2k)
        return x + self.proj(feats).to(x.dtype)
