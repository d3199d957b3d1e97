"""Genre classification of Shakespeare passages: whole plays held out, exact resume, metrics
against a direct computation, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anyformer.config import ConfigError, apply_overrides
from anyformer.tasks.sequence_classification import EVAL_SEED, PassageSampler
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.training_helpers import check_ddp_matches_one_process, interrupted_copy


def cls_config(tmp: Path, *extra: str):
    return apply_overrides(default_run_config(), [
        "--task.kind=sequence_classification", "--task.options.passage_chars=256", "--data.corpus=shakespeare",
        "--data.val_fraction=0.25", "--model.arch=encoder", "--model.dim=32", "--model.num_layers=2",
        "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64", "--model.max_seq_len=64", "--train.seq_len=64",
        "--train.batch_size=8", "--train.max_steps=8", "--train.max_minutes=null", "--train.warmup_steps=2",
        "--train.eval_every=4", "--train.log_every=2", "--train.dtype=float32", "--train.optimizer=adamw",
        "--train.samples=0", "--train.lr=3e-3", f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    tmp = tmp_path_factory.mktemp("cls")
    return Trainer(cls_config(tmp), run_dir=tmp / "run", verbose=False)


def test_whole_plays_are_held_out(trainer) -> None:
    data = trainer.data
    assert data.val_plays and set(data.labels) == {"comedies", "histories", "tragedies"}
    val_text = {bytes(p.tolist()) for p in data.val}
    train_text = {bytes(p.tolist()) for p in data.train}
    assert not val_text & train_text
    assert sorted({name.split("/")[0] for name in data.val_plays}) == data.labels  # every genre is tested
    assert sorted(set(data.val_labels.tolist())) == [0, 1, 2]


def test_evaluation_equals_a_direct_computation(trainer) -> None:
    scores = trainer.task.evaluate(trainer.model, trainer.data, trainer.env)
    data = trainer.data
    sampler = PassageSampler(data.val, data.val_labels, data, 64, EVAL_SEED, first=True)
    majority = max(range(3), key=lambda c: int((data.train_labels == c).sum()))
    correct = nll = 0.0
    trainer.model.eval()
    with torch.no_grad():
        for i in range(len(data.val)):
            inputs, keep, label = sampler.batch(torch.tensor([[i, 0]]))
            assert inputs[0, 0] == data.cls_id and torch.equal(inputs[0, 1 : int(keep.sum())], data.val[i][: int(keep.sum()) - 1])
            logits = trainer.model(inputs, keep)[0].double()
            nll -= float(torch.log_softmax(logits, -1)[int(label)])
            correct += float(int(logits.argmax()) == int(label))
    n = len(data.val)
    assert scores["accuracy"] == pytest.approx(correct / n)
    assert scores["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert scores["majority_accuracy"] == pytest.approx(float((data.val_labels == majority).float().mean()))


def test_trains_and_resumes_exactly(tmp_path) -> None:
    cfg = cls_config(tmp_path)
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task 'sequence_classification' trains model.arch 'encoder'"):
        cls_config(tmp_path, "--model.arch=decoder").validate()
    with pytest.raises(ConfigError, match="data.corpus=shakespeare"):
        cls_config(tmp_path, "--data.corpus=text").validate()
    with pytest.raises(ConfigError, match="not genre folders"):
        Trainer(cls_config(tmp_path, "--task.options.labels=[comedies, poems]"), run_dir=tmp_path / "r", verbose=False)


def test_classify_command_prints_every_label(tmp_path, capsys) -> None:
    from anyformer.cli import main

    Trainer(cls_config(tmp_path), run_dir=tmp_path / "run", verbose=False).fit()
    assert main(["classify", str(tmp_path / "run"), "KING HENRY: Once more unto the breach, dear friends"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["comedies", "histories", "tragedies"]
    assert sum(float(line.split()[1]) for line in lines) == pytest.approx(1.0, abs=2e-3)


def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    """Every example carries its own window seed and the evaluation sums over processes, so
    two processes give the losses and metrics of one."""
    cfg = cls_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4")
    check_ddp_matches_one_process(cfg, tmp_path, ("val_loss", "accuracy", "majority_accuracy"))
