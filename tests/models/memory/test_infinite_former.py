"""∞-former (model.memory.kind=infinite_former): the basis-function fit reconstructs a smooth
signal, the closed-form read of continuous attention equals numerical integration and each
density integrates to 1, the memory's size stays constant as the input grows, an untrained
memory is the segmented plain model, cached decoding equals the full forward, errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.models.memory.infinite_former import basis, density, expected_basis, fit
from anyformer.training import Trainer

from tests.helpers import assert_decoding_in_chunks_equals_forward, build
from tests.training_helpers import interrupted_copy, tiny_config


def former(**options):  # type: ignore[no-untyped-def]
    model = build(memory__kind="infinite_former", memory__options={"segment_len": 8, "num_basis": 16, **options})
    for m in model.memories:  # a trained-looking memory: its read reaches the output
        torch.nn.init.normal_(m.out.weight, std=0.3)
        torch.nn.init.normal_(m.w_mu, std=0.5)
        torch.nn.init.normal_(m.w_var, std=0.5)
    return model


def test_the_fit_reconstructs_a_smooth_signal() -> None:
    t = (torch.arange(300, dtype=torch.float64) + 0.5) / 300
    signal = torch.stack([torch.sin(2 * math.pi * t), torch.cos(3 * math.pi * t) * t], -1)[None]  # (1, L, 2)
    b = fit(signal, t, 64, 1e-4)
    recon = torch.einsum("nl,bnd->bld", basis(t, 64), b)
    assert float((recon - signal)[:, 10:-10].abs().max()) < 0.01  # away from the ends, where fewer basis functions overlap
    assert float((recon - signal).abs().max()) < 0.05


def test_the_read_equals_numerical_integration_and_densities_integrate_to_one() -> None:
    grid = torch.linspace(-4.0, 5.0, 200_001, dtype=torch.float64)
    mu = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    var = torch.tensor([0.002, 0.05, 0.3], dtype=torch.float64)
    p = density(grid, mu, var)  # (3, G)
    torch.testing.assert_close(torch.trapezoid(p, grid), torch.ones(3, dtype=torch.float64), atol=1e-8, rtol=0)
    numeric = torch.trapezoid(p[:, None, :] * basis(grid, 16)[None], grid)  # (3, N)
    torch.testing.assert_close(expected_basis(mu, var, 16), numeric, atol=1e-6, rtol=1e-6)


def test_memory_size_stays_constant_as_the_input_grows() -> None:
    model = former()
    sizes = []
    with torch.no_grad():
        cache = model.make_cache(1)
        tokens = torch.randint(0, 97, (1, 80))
        for i in range(80):
            model.decode_step(tokens[:, i : i + 1], cache, cache.next_positions(torch.ones(1, 1, dtype=torch.bool)))
            sizes.append(model.memory_size(cache.memories))
    assert sizes[:7] == [0] * 7  # nothing before the first segment ends
    assert len(set(sizes[7:])) == 1 and sizes[-1] == 2 * 16 * 32  # two layers of N x d, after 1 or 10 segments


def test_an_untrained_memory_is_the_segmented_plain_model_and_a_trained_one_reaches_forward() -> None:
    tokens = torch.randint(0, 97, (2, 30))
    fresh = build(memory__kind="infinite_former", memory__options={"segment_len": 8, "num_basis": 16})
    with torch.no_grad():
        segmented = torch.cat([fresh.inner(tokens[:, s : s + 8]) for s in range(0, 30, 8)], 1)
        torch.testing.assert_close(fresh(tokens), segmented)
        model = former()
        out = model(tokens)
        plain = torch.cat([model.inner(tokens[:, s : s + 8]) for s in range(0, 30, 8)], 1)
    torch.testing.assert_close(out[:, :8], plain[:, :8])  # the first segment has no memory
    assert float((out[:, 8:] - plain[:, 8:]).abs().max()) > 1e-3


@pytest.mark.parametrize("sticky", [False, True])
def test_cached_decoding_equals_the_full_forward(sticky: bool) -> None:
    model = former(sticky=sticky, samples=12)
    tokens = torch.randint(0, 97, (2, 29))
    assert_decoding_in_chunks_equals_forward(model, tokens, (3, 7, 1, 18))


def test_trains_from_a_config_and_resumes_exactly(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--model.memory.kind=infinite_former", "--model.memory.options.segment_len=16",
                      "--model.memory.options.num_basis=8", "--train.seq_len=64")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="num_basis \\(the memory's size\\) must be >= 1, got 0"):
        build(memory__kind="infinite_former", memory__options={"num_basis": 0})
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        build(memory__kind="infinite_former", memory__options={"samples": 0})
    with pytest.raises(ConfigError, match="old_fraction must be in \\(0, 1\\)"):
        build(memory__kind="infinite_former", memory__options={"old_fraction": 1.0})
    with pytest.raises(ConfigError, match="wraps a decoder"):
        build("encoder", memory__kind="infinite_former")
    # a segment as long as the context is the largest allowed, one sample the fewest (the bounds are inclusive)
    build(memory__kind="infinite_former", memory__options={"segment_len": 64, "num_basis": 16})
    for options in ({"samples": 1, "num_basis": 4}, {"num_basis": 1}):  # one sample, one basis function
        one = build(memory__kind="infinite_former", memory__options={"segment_len": 8, **options})
        with torch.no_grad():
            assert torch.isfinite(one(torch.randint(0, 97, (1, 20)))).all()
    with pytest.raises(ConfigError, match="segment_len=65 exceeds model.max_seq_len=64"):
        build(memory__kind="infinite_former", memory__options={"segment_len": 65})


def paper_basis(t, n_basis: int):  # type: ignore[no-untyped-def]
    """(N, L): N Gaussian densities centred evenly on [0, 1] with width 1 / N (the paper's basis), at positions t (L,), in numpy."""
    import numpy as np

    centres, width = np.linspace(0, 1, n_basis), 1 / n_basis
    return np.exp(-0.5 * ((t[None] - centres[:, None]) / width) ** 2) / (width * np.sqrt(2 * np.pi))


def ridge_fit(t, x, n_basis: int, ridge: float):  # type: ignore[no-untyped-def]
    """B = (F F^T + lambda I)^-1 F X with F the basis at positions t: the ridge regression of X (L, d), in numpy."""
    import numpy as np

    f = paper_basis(t, n_basis)
    return np.linalg.solve(f @ f.T + ridge * np.eye(n_basis), f @ x)


@pytest.mark.parametrize("old_fraction", [0.5, 0.3])
def test_the_memory_update_contracts_the_old_signal_against_a_separate_fit(old_fraction: float) -> None:
    """Two segments of distinct constant states: the update equals a ridge regression written
    out in numpy (Gaussian basis, old signal sampled evenly and moved into [0, old_fraction],
    the new states spread over the rest), and the memory reads the first state on its part of
    [0, 1] and the second on the other."""
    import numpy as np

    model = former(old_fraction=old_fraction, num_basis=24, ridge=1e-3)
    n_basis, s = 24, 8
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 3.0, 2.0])
    first = model._update(None, a.expand(1, s, 3).clone(), [])
    second = model._update(first, b.expand(1, s, 3).clone(), [])

    new_t = (np.arange(s) + 0.5) / s
    b1 = ridge_fit(new_t, np.tile(a.numpy(), (s, 1)), n_basis, 1e-3)
    old_t = (np.arange(n_basis) + 0.5) / n_basis  # samples = num_basis, evenly
    old = paper_basis(old_t, n_basis).T @ b1  # the first memory's signal at those points
    t = np.concatenate([old_fraction * old_t, old_fraction + (1 - old_fraction) * new_t])
    b2 = ridge_fit(t, np.concatenate([old, np.tile(b.numpy(), (s, 1))]), n_basis, 1e-3)
    np.testing.assert_allclose(first[0].double().numpy(), b1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second[0].double().numpy(), b2, rtol=1e-5, atol=1e-5)
    inside_old, inside_new = t[2 : n_basis - 2], t[n_basis + 2 : -1]  # away from the step between the two and the ends
    read_old, read_new = paper_basis(inside_old, n_basis).T @ b2, paper_basis(inside_new, n_basis).T @ b2  # where it was fitted
    a_, b_ = a.numpy(), b.numpy()
    assert np.abs(read_old - a_).max() < 0.15 and np.abs(read_new - b_).max() < 0.15  # the ridge smooths the step
    assert (np.linalg.norm(read_old - a_, axis=1) < 0.1 * np.linalg.norm(read_old - b_, axis=1)).all()
    assert (np.linalg.norm(read_new - b_, axis=1) < 0.1 * np.linalg.norm(read_new - a_, axis=1)).all()


def test_sticky_memories_sample_the_quantiles_of_the_attention_density() -> None:
    """Sticky memories (Martins et al. 2022) sample the old signal at the quantiles (i + 0.5) / M
    of the segment's mean attention density plus a uniform floor of 1: here one narrow density
    at 0.7, the quantiles worked out in numpy by inverting the CDF (within the implementation's
    grid step). The update then fits the old signal at those points moved into [0, f] and the
    new states over [f, 1], as a ridge regression in numpy."""
    import numpy as np

    from anyformer.models.memory.infinite_former import GRID

    f, m, s, n_basis = 0.4, 12, 8, 16
    model = former(sticky=True, samples=m, old_fraction=f, num_basis=n_basis, ridge=1e-3)
    mu, var = torch.full((1, 1, 1), 0.7), torch.full((1, 1, 1), 0.01)
    points = model._sample_points([(mu, var)], 1, torch.device("cpu"))[0].numpy()
    t = np.linspace(0, 1, 100_001)
    mass = np.exp(-0.5 * (t - 0.7) ** 2 / 0.01) / np.sqrt(2 * np.pi * 0.01) + 1.0
    cdf = np.concatenate([[0.0], np.cumsum((mass[1:] + mass[:-1]) / 2 * np.diff(t))])
    quantiles = np.interp((np.arange(m) + 0.5) / m, cdf / cdf[-1], t)
    np.testing.assert_allclose(points, quantiles, atol=1.5 / GRID)
    assert (np.abs(points - 0.7) < 0.25).sum() > m / 2  # most samples where the attention looked

    first = model._update(None, torch.randn(1, s, 3, generator=torch.Generator().manual_seed(0)), [])
    states = torch.randn(1, s, 3, generator=torch.Generator().manual_seed(1))
    second = model._update(first, states, [(mu, var)])

    old = paper_basis(points, n_basis).T @ first[0].double().numpy()
    where = np.concatenate([f * points, f + (1 - f) * (np.arange(s) + 0.5) / s])
    want = ridge_fit(where, np.concatenate([old, states[0].double().numpy()]), n_basis, 1e-3)
    np.testing.assert_allclose(second[0].double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_each_row_of_a_batch_places_its_sticky_memory_by_its_own_densities() -> None:
    """Sticky memories sample their grid by the row's own attention densities: a row in a batch
    of three different rows gets the outputs it gets alone."""
    model = former(sticky=True, samples=12)
    tokens = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batch = model(tokens)
        for row in range(3):
            torch.testing.assert_close(batch[row : row + 1], model(tokens[row : row + 1]), atol=1e-5, rtol=1e-5)
