"""The attention benchmark covers every registered kind and kernel, extrapolates budgets by a
power law, and measures one configuration in-process."""

import math

import pytest

from anyformer.bench.attention import _predict, all_methods, ratio_table
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


@pytest.mark.parametrize("mode", ["kernel", "module"])
def test_measure_one_configuration(mode):
    for method in all_methods(mode):
        if method not in ("mha[chunked]", "mha[eager]", "sliding_window", "sdpa+dense-window", "projections"):
            continue
        spec = dict(method=method, mode=mode, n=64, causal=True, backward=True, positional="alibi", num_heads=2,
                    head_dim=8, window=16, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)
        res = measure(spec)
        # one warm-up call, then one timed call (the warm-up is never the reported time)
        assert res["time_s"] > 0 and res["peak_bytes"] >= 0 and res["runs"] == 2


def test_projections_need_module_mode():
    assert "projections" not in all_methods("kernel")
    spec = dict(method="projections", mode="kernel", n=8, causal=True, backward=False, positional="none", num_heads=1,
                head_dim=4, window=4, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)
    with pytest.raises(ValueError, match="module"):
        measure(spec)


def test_ratio_table_divides_by_the_matching_sdpa_row():
    rows = [
        dict(method="mha[sdpa]", n=8, causal=True, time_s=2.0, peak_bytes=400, **{"pass": "forward"}),
        dict(method="mha[sdpa]", n=8, causal=False, time_s=9.0, peak_bytes=900, **{"pass": "forward"}),
        dict(method="mha[chunked]", n=8, causal=True, time_s=4.0, peak_bytes=100, **{"pass": "forward"}),
    ]
    line = next(l for l in ratio_table(rows) if l.startswith("mha[chunked]"))
    assert line.split()[-4:] == ["0.50", "4.0", "-", "-"]
