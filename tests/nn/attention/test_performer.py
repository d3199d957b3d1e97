"""Performer (FAVOR+): unbiased softmax estimate, orthogonal features, redraw, causal form."""

import torch

from anyformer.nn.attention.kernels import eager_attention
from anyformer.nn.attention.linear import causal_linear_attention, linear_attention
from anyformer.nn.attention.performer import (
    favor_key_features,
    favor_logits,
    favor_query_features,
    gaussian_orthogonal_matrix,
)

from tests.helpers import build


def performer_estimate(q, k, v, projection, *, causal=False):
    scale = q.shape[-1] ** -0.5
    qf = favor_query_features(q, projection, scale)
    kf = favor_key_features(k, projection, scale, torch.zeros(1))
    if causal:
        return causal_linear_attention(qf, kf, v, qf, kf, chunk_size=4, eps=0.0)[0]
    return linear_attention(qf, kf, v, qf, kf, eps=0.0)


def mean_error(num_features, *, causal=False, seeds=6):
    errors = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        # |q|, |k| ~ 2: the estimator's variance grows like exp(|q + k|^2 * scale), so inputs of
        # this size show the 1/sqrt(m) regime at small m; unit-variance inputs need far more features
        q, k, v = (torch.randn(1, 2, 32, 16, generator=g) * s for s in (0.5, 0.5, 1.0))
        exact = eager_attention(q, k, v, causal=causal)
        w = gaussian_orthogonal_matrix(num_features, 16, generator=g)
        errors.append((performer_estimate(q, k, v, w, causal=causal) - exact).abs().mean())
    return float(torch.stack(errors).mean())


def test_error_against_softmax_shrinks_with_more_features():
    errors = [mean_error(m) for m in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0], errors


def test_causal_estimate_approaches_causal_softmax():
    few, many = mean_error(16, causal=True), mean_error(1024, causal=True)
    assert many < 0.35 * few, (few, many)


def test_features_estimate_the_softmax_kernel_without_bias():
    # E[phi(x).phi(y)] = exp(x.y * scale): average over many independent iid draws
    x, y = torch.randn(1, 1, 1, 8) * 0.5, torch.randn(1, 1, 1, 8) * 0.5
    scale = 8**-0.5
    w = gaussian_orthogonal_matrix(200_000, 8, orthogonal=False)
    est = (favor_logits(x, w, scale) + favor_logits(y, w, scale)).exp().mean()
    torch.testing.assert_close(est, (x * y).sum().mul(scale).exp(), rtol=0.02, atol=0)


def test_orthogonal_blocks_have_orthogonal_rows():
    w = gaussian_orthogonal_matrix(40, 16)
    for block in (w[:16], w[16:32]):
        gram = block @ block.T
        off_diag = gram - torch.diag(gram.diagonal())
        assert off_diag.abs().max() < 1e-3 * gram.diagonal().max()


def test_features_are_redrawn_every_interval_in_training_only():
    model = build("decoder", attention__kind="performer", attention__options={"redraw_interval": 3})
    features = model.stack.blocks[0].attn.sublayer.features
    tokens = torch.randint(0, 97, (1, 5))
    first = features.projection.clone()
    model.eval()
    for _ in range(5):
        model(tokens)
    assert torch.equal(features.projection, first)
    model.train()
    snapshots = []
    for _ in range(7):
        model(tokens)
        snapshots.append(features.projection.clone())
    changed = [not torch.equal(a, b) for a, b in zip([first] + snapshots, snapshots)]
    assert changed == [False, False, False, True, False, False, True]


def test_an_interval_of_zero_never_redraws():
    model = build("decoder", attention__kind="performer", attention__options={"redraw_interval": 0}).train()
    features = model.stack.blocks[0].attn.sublayer.features
    first = features.projection.clone()
    for _ in range(4):
        model(torch.randint(0, 97, (1, 5)))
    assert torch.equal(features.projection, first)


def test_projection_is_saved_with_the_model():
    model = build("decoder", attention__kind="performer")
    assert any(k.endswith("features.projection") for k in model.state_dict())


def test_padded_keys_change_nothing_for_the_real_tokens():
    """An encoder with Performer attention over a right-padded row gives its real tokens the
    outputs of the unpadded row: padded keys get zero feature weight, whatever their tokens."""
    from tests.helpers import build

    model = build("encoder", attention__kind="performer")
    tokens = torch.randint(1, 50, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([tokens, torch.randint(1, 50, (1, 4), generator=torch.Generator().manual_seed(1))], 1)
    keep = torch.ones(1, 14, dtype=torch.bool)
    keep[:, 10:] = False
    with torch.no_grad():
        want = model(tokens)
        got = model(padded, attention_mask=keep)[:, :10]
        assert not torch.allclose(model(padded)[:, :10], want, atol=1e-4)  # the extra keys matter when not masked
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
