"""`anyformer bench attention`: bad arguments are refused before anything runs, a sweep in
which every configuration fails exits 1 saying so, and one real measurement exits 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyformer.cli import main



@pytest.fixture
def fake_bench(monkeypatch) -> list[dict]:
    """Record the configurations `bench attention` would run instead of running them."""
    import anyformer.bench.attention as bench

    calls: list[dict] = []

    def run_one(spec: dict, timeout: float) -> dict:
        calls.append(spec)
        return {"error": f"RuntimeError: boom at n={spec['n']}"}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "plot", lambda results, path: None)
    return calls


CHEAP = ["bench", "attention", "--methods", "mha[eager]", "--causal", "yes", "--passes", "forward"]


@pytest.mark.parametrize("option, message", [
    (["--lengths", "-1"], "--lengths must be positive integers, got [-1]"),
    (["--lengths", "64,0"], "--lengths must be positive integers, got [0]"),
    (["--lengths", ","], "--lengths is empty"),
    (["--methods", ","], "--methods is empty"),
    (["--heads", "0"], "--heads must be a positive integer"),
    (["--head-dim", "-8"], "--head-dim must be a positive integer"),
    (["--window", "0"], "--window must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--rounds", "0"], "--rounds must be a positive integer"),
    (["--max-seconds", "0"], "--max-seconds must be positive"),
    (["--max-memory-gb", "-1"], "--max-memory-gb must be positive"),
    (["--min-time", "-0.5"], "--min-time must be >= 0"),
    (["--positional", "nope"], "unknown positional encoding 'nope'"),
])
def test_bench_attention_refuses_bad_arguments_before_running(fake_bench: list, tmp_path: Path, capsys,
                                                              option: list[str], message: str) -> None:
    assert main([*CHEAP, "--lengths", "64", *option, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anyformer bench: error: ") and message in err and err.count("\n") == 1, err
    assert fake_bench == [] and not (tmp_path / "out").exists()


def test_bench_attention_fails_when_every_configuration_fails(fake_bench: list, tmp_path: Path, capsys) -> None:
    assert main([*CHEAP, "--lengths", "64,128", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert len(fake_bench) == 1  # the method failed at 64, so 128 was skipped
    assert "0 measured, 1 skipped, 1 failed" in out.out
    assert "no configuration could be measured" in out.err and "boom at n=64" in out.err


def test_bench_attention_runs_one_tiny_configuration(tmp_path: Path, capsys) -> None:
    """A real measurement (one fresh process) still exits 0."""
    args = [*CHEAP, "--lengths", "16", "--heads", "1", "--head-dim", "4", "--threads", "1", "--min-time", "0",
            "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["results"]
    assert [(r["method"], r["n"], "time_s" in r) for r in rows] == [("mha[eager]", 16, True)]
