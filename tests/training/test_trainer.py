"""Training loop: exact resume, data-parallel equivalence, crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anyformer.config import save_yaml
from anyformer.training import Trainer
from anyformer.training import checkpoint as ckpt
from anyformer.training.run import load_run
from tests.helpers import REPO
from tests.training_helpers import ddp_losses, interrupted_copy, tiny_config

ROOT = REPO


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_matches_uninterrupted_run(tmp_path, optimizer: str) -> None:
    # dropout: the torch RNG must resume too; muon: its momentum buffers must be restored
    cfg = tiny_config(tmp_path, "--model.dropout=0.1", f"--train.optimizer={optimizer}")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8 and full.losses[-1] < full.losses[0]
    # the same run, interrupted after its step-4 checkpoint
    part = interrupted_copy(tmp_path / "full", tmp_path / "part")
    resumed = Trainer(cfg, run_dir=part, resume=True, verbose=False).fit()
    assert resumed.step == 8
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 9))  # records after the checkpoint were replaced, not duplicated


def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--train.max_steps=5", "--train.eval_every=5")
    single = Trainer(cfg, run_dir=tmp_path / "single", verbose=False).fit()
    for losses in ddp_losses(cfg, tmp_path):
        assert losses == pytest.approx(single.losses, abs=1e-5)
    assert (tmp_path / "run" / "checkpoints" / "step_0000005").is_dir()
    assert not Path(str(tmp_path / "run") + "-2").exists()  # only rank 0 wrote files


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from anyformer.config import load_yaml
    from anyformer.training import Trainer
    from anyformer.training import checkpoint as ckpt
    from anyformer.training.config import RunConfig

    cfg = load_yaml(RunConfig, sys.argv[1])
    trainer = Trainer(cfg, run_dir=sys.argv[2], verbose=False)
    trainer.fit()  # ends with a checkpoint at step 4
    real = ckpt._write_files

    def write_then_die(folder, *args):
        real(folder, *args)
        os.kill(os.getpid(), signal.SIGKILL)  # killed with the new checkpoint half made

    ckpt._write_files = write_then_die
    trainer.train_step()
    trainer.save(0.0)
    """
)


def test_kill_while_writing_keeps_previous_checkpoint(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4")
    save_yaml(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "cfg.yaml"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # the half-written one
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step_0000004"
    run = load_run(tmp_path / "run", "latest")
    assert run.state["step"] == 4
    resumed = Trainer(cfg, run_dir=tmp_path / "run", resume=True, verbose=False)
    assert resumed.step == 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_reported(tmp_path, damage: str) -> None:
    cfg = tiny_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4")
    Trainer(cfg, run_dir=tmp_path / "run", verbose=False).fit()
    weights = tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted or truncated"):
        load_run(tmp_path / "run")
    # the weights reader alone also refuses a truncated file
    if damage == "truncate":
        with pytest.raises(ckpt.CheckpointError, match="corrupted or truncated"):
            ckpt.load_weights(torch.nn.Linear(2, 2), weights.parent)


def test_keeps_last_k_and_best(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "--train.max_steps=12", "--train.eval_every=2", "--train.keep_last=2")
    trainer = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    trainer.fit()
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    best = json.loads((ckpts / "best.json").read_text())
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert best["step"] == best_step
    assert set(names) == {"step_0000010", "step_0000012", f"step_{best_step:07d}"}
    tied = load_run(tmp_path / "run", "latest").model
    assert tied.lm_head.proj.weight is tied.embed.tokens.weight
    assert torch.equal(tied.embed.tokens.weight, trainer.model.embed.tokens.weight)


def test_wall_clock_budget_stops_the_run_after_warmup_with_several_evaluations(tmp_path) -> None:
    """A budget far shorter than warmup_steps and eval_every (the situation of a one-minute run
    of a model whose steps take a second): the plan caps the warmup and the evaluation interval,
    so the run reaches its peak learning rate and records several validation points."""
    cfg = tiny_config(tmp_path, "--train.max_steps=1000000", "--train.max_minutes=0.2", "--train.warmup_steps=1000000",
                      "--train.eval_every=1000000", "--train.lr=0.001")
    trainer = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    trainer.start_time = time.perf_counter()  # count the budget from here (data preparation excluded)
    result = trainer.fit()
    assert 0 < result.step < 1000000  # stopped by the clock, not by max_steps
    assert (tmp_path / "run" / "checkpoints" / f"step_{result.step:07d}").is_dir()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert max(lrs) > 0.95 * 0.001  # warmup ended: about the peak learning rate was reached (the plan moves it a little)
    assert lrs[-1] < max(lrs)  # and the cosine decay began
    assert len([r for r in records if r["kind"] == "eval"]) >= 3


def test_resuming_a_finished_run_changes_nothing(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run, verbose=False).fit()
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = Trainer(cfg, run_dir=run, resume=True, verbose=False)
    assert again.finished
    result = again.fit()
    assert result.step == 8 and result.losses == []
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # no new evaluation record, checkpoint or file


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_is_refused(tmp_path, value: str) -> None:
    from anyformer.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        tiny_config(tmp_path, f"--train.lr={value}").validate()
