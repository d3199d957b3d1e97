"""A new run that fails before its first checkpoint leaves no folder (the same command can be
run again as it was); one that fails later keeps its checkpoints and says how to resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyformer.cli import main
from anyformer.config import save_yaml
from anyformer.training import Trainer
from tests.training_helpers import tiny_config


def failing_at(monkeypatch, step: int) -> None:
    """Make training raise once `step` steps are done."""
    original = Trainer.train_step

    def train_step(self):  # type: ignore[no-untyped-def]
        if self.step >= step:
            raise RuntimeError("out of memory (injected)")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("given", ["new", "empty"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path: Path, monkeypatch, given: str) -> None:
    cfg = tiny_config(tmp_path, "--train.eval_every=4")
    out = tmp_path / "runs" / "first"
    if given == "empty":
        out.mkdir(parents=True)
    failing_at(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected"):
        Trainer(cfg, run_dir=out, verbose=False).fit()
    assert (out.is_dir() and not any(out.iterdir())) if given == "empty" else not out.exists()
    monkeypatch.undo()
    save_yaml(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(out), "--quiet"]) == 0  # the same command, again
    assert (out / "checkpoints" / "latest.json").is_file() and not list(out.parent.glob("first-*"))


def test_a_run_that_fails_after_a_checkpoint_keeps_it_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = tiny_config(tmp_path, "--train.eval_every=2")
    out = tmp_path / "run"
    failing_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="injected"):
        Trainer(cfg, run_dir=out, verbose=False).fit()
    assert f"anyformer train --resume {out}" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_0000002", "step_0000004"]
    monkeypatch.undo()
    result = Trainer(cfg, run_dir=out, resume=True, verbose=False).fit()
    assert result.step == 8
