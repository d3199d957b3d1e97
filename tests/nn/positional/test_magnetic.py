"""The direction-aware (magnetic Laplacian) positional encoding of Geisler et al. 2023."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import ConfigError
from anyformer.nn.positional.magnetic import graph_adjacency, magnetic_eigenvectors, magnetic_laplacian


def random_digraph(n: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    adj = (torch.rand(n, n, generator=g) < p).double()
    adj.fill_diagonal_(0)
    return adj[None]


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25])
def test_magnetic_laplacian_is_hermitian_with_real_eigenvalues(q: float) -> None:
    L = magnetic_laplacian(random_digraph(9, 0.3, 0), q)[0]
    torch.testing.assert_close(L, L.conj().T)
    vals = torch.linalg.eigvals(L)  # the general solver, which does not assume symmetry
    assert vals.imag.abs().max() < 1e-10
    assert vals.real.min() > -1e-10 and vals.real.max() < 2 + 1e-10  # normalised Laplacian spectrum in [0, 2]


def test_q_zero_gives_the_symmetric_normalised_laplacian() -> None:
    adj = random_digraph(8, 0.35, 1)[0]
    sym = ((adj + adj.T) > 0).double()
    deg = sym.sum(1)
    d = torch.diag(torch.where(deg > 0, deg ** -0.5, torch.zeros_like(deg)))
    expected = torch.eye(8, dtype=torch.float64) - d @ sym @ d
    torch.testing.assert_close(magnetic_laplacian(adj[None], 0.0)[0].real, expected)
    assert magnetic_laplacian(adj[None], 0.0)[0].imag.abs().max() == 0


def test_entries_of_a_small_directed_graph_are_the_written_out_values() -> None:
    """Edges 0 -> 1 -> 2 and 2 <-> 3, q = 1/8: L = I - D^-1/2 (A_s * exp(i 2 pi q (A - A^T))) D^-1/2,
    each entry computed by hand (degrees of the undirected graph 1, 2, 2, 1)."""
    adj = torch.zeros(4, 4, dtype=torch.float64)
    for u, v in [(0, 1), (1, 2), (2, 3), (3, 2)]:
        adj[u, v] = 1
    L = magnetic_laplacian(adj[None], 0.125)[0]
    phase = complex(math.cos(math.pi / 4), math.sin(math.pi / 4))  # exp(i 2 pi / 8) along an edge, its conjugate against it
    expected = torch.tensor([
        [1, -phase / math.sqrt(2), 0, 0],
        [-phase.conjugate() / math.sqrt(2), 1, -phase / 2, 0],
        [0, -phase.conjugate() / 2, 1, -1 / math.sqrt(2)],  # 2 <-> 3: both directions, no phase
        [0, 0, -1 / math.sqrt(2), 1],
    ], dtype=torch.complex128)
    torch.testing.assert_close(L, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, q", [(5, 0.1), (6, 0.25), (7, 0.0), (8, 0.4)])
def test_the_directed_cycle_has_the_closed_form_spectrum(n: int, q: float) -> None:
    """On the directed n-cycle the eigenvectors are the Fourier modes and the eigenvalues are
    1 - cos(2 pi (j / n + q)), j = 0 .. n - 1."""
    adj = torch.zeros(1, n, n, dtype=torch.float64)
    for u in range(n):
        adj[0, u, (u + 1) % n] = 1
    got = torch.linalg.eigvalsh(magnetic_laplacian(adj, q)[0])
    want = torch.sort(torch.tensor([1 - math.cos(2 * math.pi * (j / n + q)) for j in range(n)], dtype=torch.float64)).values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    vals, _ = magnetic_eigenvectors(adj, q, 2)
    torch.testing.assert_close(vals[0], want[:2], rtol=0, atol=1e-12)


def test_reversing_every_edge_conjugates_the_laplacian_and_the_eigenvectors() -> None:
    adj = random_digraph(10, 0.3, 2)
    q = 0.2
    torch.testing.assert_close(magnetic_laplacian(adj.transpose(-1, -2), q), magnetic_laplacian(adj, q).conj())
    vals, vecs = magnetic_eigenvectors(adj, q, 4)
    rvals, rvecs = magnetic_eigenvectors(adj.transpose(-1, -2), q, 4)
    assert (vals[0, 1:] - vals[0, :-1]).min() > 1e-6  # distinct eigenvalues: eigenvectors unique up to phase
    torch.testing.assert_close(rvals, vals)
    torch.testing.assert_close(rvecs, vecs.conj())


def test_undirected_graphs_get_the_same_encoding_for_any_q() -> None:
    adj = random_digraph(9, 0.3, 3)
    und = ((adj + adj.transpose(-1, -2)) > 0).double()
    base = magnetic_eigenvectors(und, 0.0, 5)[1]
    for q in (0.05, 0.25, 0.5):
        torch.testing.assert_close(magnetic_eigenvectors(und, q, 5)[1], base)


def test_direction_changes_the_encoding() -> None:
    adj = random_digraph(9, 0.3, 4)
    a = magnetic_eigenvectors(adj, 0.25, 4)[1]
    b = magnetic_eigenvectors(adj.transpose(-1, -2), 0.25, 4)[1]
    assert (a - b).abs().max() > 1e-3


def test_attention_mask_is_read_as_key_to_query_edges() -> None:
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 2, 0] = True  # query 2 attends key 0: the edge 0 -> 2
    adj = graph_adjacency(mask, 3)
    assert adj[0, 0, 2] == 1 and adj.sum() == 1
    additive = torch.full((3, 3), float("-inf"))
    additive[2, 0] = 0.0
    assert torch.equal(graph_adjacency(additive, 3), adj)


def graph_encoder(q: float = 0.25) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="encoder", vocab_size=30, dim=32, num_layers=2, max_seq_len=16, attention={"num_heads": 4},
                      positional={"kind": "magnetic", "options": {"q": q, "k": 4}}, head={"kind": "none"})
    return build_model(cfg)


def test_encoder_over_graph_edges_trains() -> None:
    model = graph_encoder()
    n = 8
    adj = random_digraph(n, 0.3, 5)[0].bool()
    mask = (adj.T | torch.eye(n, dtype=torch.bool))[None, None].expand(2, 1, n, n)  # attend along edges (and self)
    tokens = torch.randint(0, 30, (2, n))
    target = torch.randn(2, n, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (model(tokens, attn_mask=mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and model.positional.proj.weight.grad is not None
    with torch.no_grad():  # the encoding depends on edge direction
        out = model(tokens, attn_mask=mask)
        rev = model(tokens, attn_mask=mask.transpose(-1, -2))
    assert (out - rev).abs().max() > 1e-4


def test_missing_graph_and_bad_options_are_named() -> None:
    model = graph_encoder()
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.randint(0, 30, (1, 5)))
    for options, name in [({"k": 0}, "k"), ({"q": -0.1}, "q"), ({"q": 0.75}, "q")]:
        with pytest.raises(ConfigError, match=f"model.positional.options.{name}"):
            build_model(ModelConfig(arch="encoder", dim=32, positional={"kind": "magnetic", "options": options}))
    assert math.isclose(0.25, model.positional.options.q)


def test_a_graph_smaller_than_k_is_padded_with_zeros() -> None:
    """A 3-node directed path asked for k = 5: the first three eigenpairs are the graph's own
    (the eigenvectors unit-norm and orthogonal), the two slots beyond it are exactly zero."""
    adj = torch.zeros(1, 3, 3)
    adj[0, 0, 1] = adj[0, 1, 2] = 1.0
    vals, vecs = magnetic_eigenvectors(adj, 0.1, 5)
    assert vals.shape == (1, 5) and vecs.shape == (1, 3, 5)
    assert torch.equal(vals[0, 3:], torch.zeros(2)) and torch.equal(vecs[0, :, 3:], torch.zeros(3, 2, dtype=vecs.dtype))
    gram = vecs[0, :, :3].conj().T @ vecs[0, :, :3]
    torch.testing.assert_close(gram, torch.eye(3, dtype=gram.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(vals[0, :3], torch.linalg.eigvalsh(magnetic_laplacian(adj, 0.1))[0], atol=1e-5, rtol=0)
