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


def test_approximate_methods_report_their_error_against_exact_attention():
    def spec(method, n):
        return dict(method=method, mode="kernel", n=n, causal=True, backward=False, positional="none", num_heads=2,
                    head_dim=16, window=16, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)

    assert "rel_error" not in measure(spec("mha[sdpa]", 64))
    assert measure(spec("hyper", 64))["rel_error"] < 1e-5  # below min_seq_len hyper is exact attention
    approx = measure(spec("hyper", 4096))["rel_error"]  # parts above 1024 keys sampled: random q, k give large errors
    performer = measure(spec("performer", 256))["rel_error"]
    hierarchical = measure(spec("hierarchical", 256))["rel_error"]  # far keys scored as block means
    assert 1e-3 < approx < 10 and 1e-3 < performer < 10 and 1e-3 < hierarchical < 10


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
    assert line.split()[-5:] == ["0.50", "4.0", "-", "-", "-"]  # no error column for an exact kernel


def test_sweep_interleaves_methods_per_length_and_keeps_the_best_round(tmp_path, monkeypatch):
    """Every method runs at a length before any runs at the next (a drift in machine speed then
    falls on all of them), each extra round measures again, and a configuration keeps its best
    time and its largest peak; the JSON on disk holds every row."""
    import json

    import anyformer.bench.attention as bench

    calls = []
    fake = {  # (method, n, round) -> (time, peak)
        ("a", 64, 0): (3.0, 10), ("b", 64, 0): (2.0, 20), ("a", 128, 0): (5.0, 30), ("b", 128, 0): (4.0, 40),
        ("a", 64, 1): (1.0, 5), ("b", 64, 1): (2.5, 25), ("a", 128, 1): (6.0, 35), ("b", 128, 1): (3.5, 10),
    }

    def run_one(spec, timeout):
        rnd = sum(1 for c in calls if c == (spec["method"], spec["n"]))
        calls.append((spec["method"], spec["n"]))
        t, peak = fake[(spec["method"], spec["n"], rnd)]
        return {"time_s": t, "peak_bytes": peak, "runs": 2, "mode": "kernel"}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "plot", lambda results, path: None)
    cfg = bench.BenchConfig(methods=["a", "b"], lengths=[128, 64], causal=[True], passes=["forward"], rounds=2)
    results = bench.run(cfg, tmp_path, log=lambda line: None)
    assert calls == [("a", 64), ("b", 64), ("a", 128), ("b", 128)] * 2
    got = {(r["method"], r["n"]): (r["time_s"], r["peak_bytes"], r["round_times_s"]) for r in results}
    for (m, n), (t, peak, rounds) in got.items():
        assert rounds == [fake[(m, n, 0)][0], fake[(m, n, 1)][0]]
        assert t == min(rounds) and peak == max(fake[(m, n, 0)][1], fake[(m, n, 1)][1])
    on_disk = json.loads((tmp_path / "attention.json").read_text())["results"]
    assert len(on_disk) == 4 and all("time_s" in r for r in on_disk)


def test_relative_encodings_are_timed_inside_the_layer():
    """A positional kind whose terms come from the queries or probabilities (shaw) cannot act on
    ready q, k, v: kernel mode times the whole module and says so."""
    spec = dict(method="mha[chunked]", mode="kernel", n=256, causal=True, backward=True, positional="shaw", num_heads=2,
                head_dim=16, window=16, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)
    assert measure(spec)["mode"] == "module"
    assert measure(dict(spec, positional="none"))["mode"] == "kernel"
