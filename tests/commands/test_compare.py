"""`anyformer compare`: equal budgets, results equal to each run's own metrics, resumable after
SIGKILL, failing variants reported, clear errors before anything trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from anyformer.config import ConfigError, to_dict
from anyformer.training import Trainer
from anyformer.training.compare import load_spec, run_comparison
from tests.training_helpers import tiny_config


def write_spec(tmp: Path, **changes) -> Path:
    base = to_dict(tiny_config(tmp, "--train.eval_every=3", "--train.log_every=1"))
    spec = {"base": base, "variants": {"rope": {}, "alibi": {"model.positional.kind": "alibi"}},
            "budget": {"tokens": 8 * 32 * 6}, "seeds": [0, 1]}
    spec.update(changes)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_variants_two_seeds_give_the_table_and_plots(tmp_path) -> None:
    spec = load_spec(write_spec(tmp_path))
    results = run_comparison(spec, tmp_path / "cmp", verbose=False)
    out = tmp_path / "cmp"
    for name in ("results.json", "results.md", "val_loss_vs_time.png", "val_loss_vs_tokens.png", "val_loss_vs_flops.png", "pareto.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "results.md").read_text()
    assert "| rope |" in table and "| alibi |" in table
    for v in results["variants"]:
        assert v["status"] == "ok" and v["steps"] == [6, 6]  # 8 x 32 tokens per step: 6 steps
        finals, bests = [], []
        for seed in (0, 1):
            evals = [r for r in metrics(out / v["name"] / f"seed_{seed}") if r["kind"] == "eval"]
            finals.append(evals[-1]["val_loss"])
            bests.append(min(r["val_loss"] for r in evals))
            cfg = yaml.safe_load((out / v["name"] / f"seed_{seed}" / "config.yaml").read_text())
            assert cfg["train"]["seed"] == seed
        assert v["final"]["values"] == pytest.approx(finals) and v["best"]["values"] == pytest.approx(bests)
        assert v["final"]["mean"] == pytest.approx(sum(finals) / 2)
        assert v["final"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert v["peak_memory_mib"] > 50 and v["tokens_per_s"] > 0
    assert finals[0] != finals[1]  # the seeds differ
    # running again trains nothing and gives the same results
    t0 = time.perf_counter()
    again = run_comparison(spec, out, verbose=False)
    assert time.perf_counter() - t0 < 20 and again == json.loads(json.dumps(results))


def test_a_failing_variant_is_reported_and_the_others_finish(tmp_path) -> None:
    path = write_spec(tmp_path, seeds=[0], variants={"good": {}, "broken": {"data.path": str(tmp_path / "missing")}})
    results = run_comparison(load_spec(path), tmp_path / "cmp", verbose=False)
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["good"]["status"] == "ok" and by_name["broken"]["status"] == "failed"
    assert "missing" in by_name["broken"]["errors"][0]
    assert "| broken | failed:" in (tmp_path / "cmp" / "results.md").read_text()


def test_sigkill_then_rerun_equals_an_uninterrupted_comparison(tmp_path) -> None:
    path = write_spec(tmp_path, seeds=[0], budget={"steps": 12})
    whole = run_comparison(load_spec(path), tmp_path / "whole", verbose=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "anyformer", "compare", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "alibi" / "seed_0" / "checkpoints" / "step_0000006"  # the second variant, half way
    deadline = time.time() + 240
    while not target.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert target.is_dir(), "the comparison did not reach the second variant's middle checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # compare and its training child
    proc.wait()
    resumed = run_comparison(load_spec(path), out, verbose=False)
    for a, b in zip(whole["variants"], resumed["variants"]):
        assert a["name"] == b["name"] and b["steps"] == [12]
        assert b["final"]["values"] == pytest.approx(a["final"]["values"], abs=1e-6)
        assert b["best"]["values"] == pytest.approx(a["best"]["values"], abs=1e-6)
    losses = lambda run: [r["loss"] for r in metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(out / "alibi" / "seed_0") == pytest.approx(losses(tmp_path / "whole" / "alibi" / "seed_0"), abs=1e-6)


@pytest.mark.parametrize("kind", ["tokens", "flops"])
def test_token_and_flop_budgets_stop_within_one_step(tmp_path, kind) -> None:
    probe = Trainer(tiny_config(tmp_path), run_dir=tmp_path / "probe", verbose=False)
    per_step = probe.tokens_per_step * (probe.flops_per_token if kind == "flops" else 1)
    amount = 5.4 * per_step
    t = Trainer(tiny_config(tmp_path, f"--train.max_{kind}={amount}", "--train.max_steps=1000"), run_dir=tmp_path / "run", verbose=False)
    result = t.fit()
    assert abs(result.step * per_step - amount) <= per_step  # the nearest whole step: 5
    assert result.step == 5


def test_bad_specs_are_refused_before_training(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"variant 'x'.*unknown config key 'model.atention.kind'.*valid"):
        load_spec(write_spec(tmp_path, variants={"x": {"model.atention.kind": "linear"}}))
    with pytest.raises(ConfigError, match="variants must be a non-empty mapping"):
        load_spec(write_spec(tmp_path, variants={}))
    with pytest.raises(ConfigError, match="budget tokens must be a positive number"):
        load_spec(write_spec(tmp_path, budget={"tokens": 0}))
    with pytest.raises(ConfigError, match="budget must be one of minutes, tokens, flops, steps"):
        load_spec(write_spec(tmp_path, budget={"hours": 1}))
    with pytest.raises(ConfigError, match="variant 'mlm' changes the task"):
        load_spec(write_spec(tmp_path, variants={"mlm": {"task.kind": "masked_lm", "model.arch": "encoder",
                                                         "model.head.kind": "mlm", "data.corpus": "proteins"}}))
    with pytest.raises(ConfigError, match="seeds must be a non-empty list"):
        load_spec(write_spec(tmp_path, seeds=[]))
    assert not (tmp_path / "runs").exists()


def test_a_non_language_task_compares_on_its_own_metric_with_runs_placed_on_gpus(tmp_path, monkeypatch) -> None:
    """An image-classification comparison ranked by accuracy (higher is better), two runs at
    once, each given its own GPU when there are several (two are faked here: on a machine
    without CUDA the runs train on the CPU either way, but each gets CUDA_VISIBLE_DEVICES)."""
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    from anyformer.training import compare
    from tests.tasks.test_image_classification import vit_config

    base = to_dict(vit_config(tmp_path, "--train.max_steps=4", "--train.eval_every=2"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": base, "variants": {"cls": {}, "mean": {"model.head.pooling": "mean"}},
                                    "budget": {"steps": 4}, "seeds": [0], "metric": "accuracy", "parallel": 2}))
    monkeypatch.setattr(compare, "gpus", lambda: ["0", "1"])
    results = run_comparison(load_spec(path), tmp_path / "cmp", verbose=False)
    assert results["lower_is_better"] is False
    for v in results["variants"]:
        evals = [r for r in metrics(tmp_path / "cmp" / v["name"] / "seed_0") if r["kind"] == "eval"]
        assert v["status"] == "ok" and v["final"]["values"] == pytest.approx([evals[-1]["accuracy"]])
        assert v["best"]["values"] == pytest.approx([max(r["accuracy"] for r in evals)])
    records = [json.loads((tmp_path / "cmp" / name / "seed_0.json").read_text()) for name in ("cls", "mean")]
    assert sorted(r["cuda_visible_devices"] for r in records) == ["0", "1"]
    assert "CUDA_VISIBLE_DEVICES=" in (tmp_path / "cmp" / "cls" / "seed_0.log").read_text()


def test_a_spec_that_is_not_valid_yaml_is_one_error(tmp_path, capsys) -> None:
    """The same error path as `train` and `info` for a broken YAML file or one that is not UTF-8."""
    from anyformer.cli import main

    (tmp_path / "broken.yaml").write_text("base: [unclosed\nvariants: {a: {}}\n")
    (tmp_path / "latin1.yaml").write_bytes("base: caf\xe9\n".encode("latin-1"))
    for name, message in [("broken.yaml", "is not valid YAML"), ("latin1.yaml", "is not UTF-8 text")]:
        for command in (["compare", str(tmp_path / name), "--out", str(tmp_path / "out")], ["info", str(tmp_path / name)],
                        ["train", str(tmp_path / name)]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert message in err and name in err and "Traceback" not in err, (command, err)
    assert not (tmp_path / "out").exists()


def test_every_shipped_comparison_loads_and_its_variants_validate() -> None:
    from tests.helpers import REPO

    specs = sorted((REPO / "configs" / "compare").glob("*.yaml"))
    assert {"attention.yaml", "mixers.yaml"} <= {p.name for p in specs}
    for path in specs:
        spec = load_spec(path)  # each variant's config is validated as it is read
        assert spec.variants and len(spec.seeds) >= 1, path


def test_variants_may_change_training_side_task_options_only(tmp_path) -> None:
    """Augmentation on and off is a comparison of one task; the held-out split or the sample
    count of the test set is not (it changes what the metric is computed on)."""
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    from tests.tasks.test_image_classification import vit_config

    base = to_dict(vit_config(tmp_path))
    path = tmp_path / "spec.yaml"
    variants = {"plain": {}, "explicit_default": {"task.options.augment": False},
                "augmented": {"task.options.augment": True, "task.options.shift": 1, "task.options.flip": True}}
    path.write_text(yaml.safe_dump({"base": base, "variants": variants, "budget": {"steps": 2}}))
    spec = load_spec(path)
    options = {name: spec.run_config(name, 0, tmp_path / name).task.options for name in variants}
    assert options["augmented"] == {"augment": True, "shift": 1, "flip": True} and not options["plain"]
    point_base = to_dict(tiny_config(tmp_path))  # a causal LM: its sample settings only shape the end-of-run samples
    path.write_text(yaml.safe_dump({"base": point_base, "variants": {"a": {}, "b": {"task.options.temperature": 0.0}},
                                    "budget": {"steps": 2}}))
    assert load_spec(path).run_config("b", 0, tmp_path / "b").task.options["temperature"] == 0.0
    from tests.models.test_point_cloud import task_config

    path.write_text(yaml.safe_dump({"base": to_dict(task_config(tmp_path)), "budget": {"steps": 2},
                                    "variants": {"a": {}, "b": {"task.options.augment": False, "task.options.noise": 0.05}}}))
    with pytest.raises(ConfigError, match=r"variant 'b' changes task.options noise, .*only the options that shape training \(augment\)"):
        load_spec(path)


def test_best_and_significance_marks_on_synthetic_run_summaries(tmp_path, monkeypatch) -> None:
    """The best variant, the difference to it and its significance (a difference within the
    larger of the two seed spreads is not significant) on run summaries written by hand, for a
    metric where lower is better and one where higher is."""
    from anyformer.training import compare
    from anyformer.training.compare_report import results_markdown

    finals = {"a": [1.00, 1.10], "b": [1.09, 1.11], "c": [1.60, 1.62]}  # std: a 0.0707, b 0.0141, c 0.0141

    def summary(slot, metric, lower):  # type: ignore[no-untyped-def]
        value = finals[slot.variant][slot.seed]
        return {"seed": slot.seed, "status": "ok", "error": None, "peak_memory_mib": 100.0, "seconds": 1.0, "final": value,
                "best": value, "tokens_per_s": 10.0, "parameters": 1000, "flops_per_token": 1e6, "steps": 3, "tokens": 96}

    monkeypatch.setattr(compare, "_run_summary", summary)
    for metric, lower in (("val_loss", True), ("accuracy", False)):
        spec = load_spec(write_spec(tmp_path, variants={"a": {}, "b": {"model.dim": 48}, "c": {"model.dim": 64}}, metric=metric))
        results = compare.collect_results(spec, tmp_path / "cmp")
        by = {v["name"]: v for v in results["variants"]}
        best = "a" if lower else "c"
        assert [n for n, v in by.items() if v["is_best"]] == [best]
        assert by["b"]["vs_best"] == pytest.approx(sum(finals["b"]) / 2 - sum(finals[best]) / 2)
        if lower:
            # b is 0.05 worse than a: above b's own spread (0.014), within a's (0.071): not significant
            assert by["b"]["significant"] is False and by["c"]["significant"] is True
        else:
            assert by["b"]["significant"] is True and by["a"]["significant"] is True  # 0.51 and 0.56 below c
        table = results_markdown(results)
        assert f"| {best} |" in table and "| best |" in table
        assert ("(not significant)" in table) == lower
    one = load_spec(write_spec(tmp_path, variants={"a": {}, "b": {"model.dim": 48}}, seeds=[0]))
    assert [v["significant"] for v in compare.collect_results(one, tmp_path / "cmp1")["variants"]] == [None, None]
