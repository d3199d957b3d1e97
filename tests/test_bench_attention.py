"""The attention benchmark covers every registered kind and kernel, extrapolates budgets by a
power law, and measures one configuration in-process."""

import math

from anyformer.bench.attention import _predict, all_methods
from anyformer.bench.attention_run import measure
from anyformer.nn.attention import ATTENTIONS, KERNELS


def test_methods_cover_the_registries():
    methods = all_methods()
    assert all(f"mha[{k}]" in methods for k in KERNELS.names())
    assert all(k in methods for k in ATTENTIONS.names() if k != "mha")


def test_prediction_follows_the_fitted_power_law():
    assert math.isclose(_predict([(1000, 2.0)], 4000), 32.0)  # quadratic by default
    assert math.isclose(_predict([(1000, 1.0), (2000, 2.0)], 8000), 8.0)  # linear fit
    assert math.isclose(_predict([(1000, 1.0), (2000, 16.0)], 4000), 64.0)  # exponent clamped at 2


def test_measure_one_configuration():
    for method in ("mha[chunked]", "sliding_window", "sdpa+dense-window", "projections"):
        spec = dict(method=method, n=64, causal=True, backward=True, positional="alibi", num_heads=2, head_dim=8,
                    window=16, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)
        res = measure(spec)
        assert res["time_s"] > 0 and res["peak_bytes"] >= 0 and res["runs"] == 1
