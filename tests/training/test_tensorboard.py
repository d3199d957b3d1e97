"""TensorBoard event files: the scalars of metrics.jsonl, read back with TensorBoard's own
reader; a resumed run replaces what an interrupted one logged after its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyformer.config import ConfigError
from anyformer.training import Trainer
from tests.training_helpers import interrupted_copy, tiny_config

pytest.importorskip("tensorboard", reason="pip install tensorboard")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_event_files_hold_the_logged_scalars(tmp_path) -> None:
    Trainer(tiny_config(tmp_path, "--train.tensorboard=true"), run_dir=tmp_path / "run", verbose=False).fit()
    got = scalars(tmp_path / "run")
    train, evals = records(tmp_path / "run", "train"), records(tmp_path / "run", "eval")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [s for s, _ in got[f"train/{key}"]] == [r["step"] for r in train]
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert [v for _, v in got["eval/val_loss"]] == pytest.approx([r["val_loss"] for r in evals], rel=1e-6)
    assert all(r["grad_norm"] > 0 for r in train)


def test_a_resumed_run_replaces_the_lost_steps(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--train.tensorboard=true")
    Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    part = interrupted_copy(tmp_path / "full", tmp_path / "part")  # its event file still holds steps 5-8
    Trainer(cfg, run_dir=part, resume=True, verbose=False).fit()
    full, resumed = scalars(tmp_path / "full"), scalars(part)
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 9))  # each step once
    assert [v for _, v in resumed["train/loss"]] == pytest.approx([v for _, v in full["train/loss"]], abs=1e-6)


def test_without_the_package_the_setting_says_how_to_install(tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tiny_config(tmp_path, "--train.tensorboard=true").validate()
