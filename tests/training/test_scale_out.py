"""Scaling out: FSDP2 sharding (gloo processes on CPU), sharded checkpoints that resume at another
number of processes, export to single-file checkpoints, activation checkpointing, and torchrun
launches (two "nodes" over the loopback rendezvous; a rank killed under --max-restarts)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anyformer.config import ConfigError, apply_overrides, save_yaml
from anyformer.models import build_model
from anyformer.models.registry import BLOCKS
from anyformer.training import Trainer
from anyformer.training import checkpoint as ckpt
from anyformer.training.parallel import blocks_of, enable_activation_checkpointing
from anyformer.training.run import load_run

from tests.helpers import run_model, tiny_config
from tests.training_helpers import _free_port, ddp_losses, interrupted_copy, tiny_config as tiny_run_config


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ------------------------------------------------------------------ FSDP2


@pytest.mark.parametrize("optimizer, accum, tol", [("adamw", 1, 1e-5), ("muon", 2, 2e-4)])
def test_fsdp_training_equals_one_process(tmp_path: Path, optimizer: str, accum: int, tol: float) -> None:
    """Two gloo processes sharding the model train on the same global batch as one process and
    give its losses (AdamW: 1e-5 in fp32; Muon orthogonalises in bf16, where the last bits of a
    reduced gradient move the update by ~1e-5 per step); each writes sharded checkpoints."""
    cfg = tiny_run_config(tmp_path, f"--train.optimizer={optimizer}", f"--train.grad_accum={accum}")
    single = Trainer(cfg, run_dir=tmp_path / "single", verbose=False).fit()
    sharded = apply_overrides(cfg, ["--train.parallel=fsdp"])
    for losses in ddp_losses(sharded, tmp_path):
        assert losses == pytest.approx(single.losses, abs=tol)
    folder = ckpt.find_checkpoint(tmp_path / "run", "latest")
    assert ckpt.is_sharded_checkpoint(folder) and not (folder / "model.safetensors").exists()
    state = ckpt.read_state(folder)
    assert state["format"] == "sharded" and state["processes"] == 2
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "optimizer/.metadata"} <= set(state["files"])
    # the sharded weights read whole in one process are the weights the processes trained
    one = _records(tmp_path / "single", "eval")[-1]["val_loss"]
    two = _records(tmp_path / "run", "eval")[-1]["val_loss"]
    assert two == pytest.approx(one, abs=tol)


def test_fsdp_mixed_precision_policy(tmp_path: Path) -> None:
    """bf16 gathered parameters with fp32 gradient reduction: the losses follow the fp32 run
    to bf16 rounding, and the sharded parameters (what checkpoints hold) stay fp32."""
    cfg = tiny_run_config(tmp_path, "--train.max_steps=4")
    single = Trainer(cfg, run_dir=tmp_path / "single", verbose=False).fit()
    mixed = apply_overrides(cfg, ["--train.parallel=fsdp", "--train.fsdp_param_dtype=bfloat16", "--train.fsdp_reduce_dtype=float32"])
    losses = ddp_losses(mixed, tmp_path)[0]
    assert losses == pytest.approx(single.losses, abs=0.03)
    assert losses != pytest.approx(single.losses, abs=1e-6)  # the policy took effect
    plain = load_run(tmp_path / "run", "latest", "cpu")
    assert all(p.dtype == torch.float32 for p in plain.model.parameters())


@pytest.mark.parametrize("optimizer, tol", [("adamw", 1e-5), ("muon", 2e-4)])
def test_sharded_checkpoint_resumes_at_one_and_at_two_processes(tmp_path: Path, optimizer: str, tol: float) -> None:
    """A checkpoint written by 2 FSDP processes, resumed in 1 plain process and in 2 FSDP
    processes, gives the losses the uninterrupted run had after it (Muon: with its parameter
    group for an untied head left empty by the tied head; bf16 orthogonalisation in one
    process against two as in the equality test above)."""
    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.parallel=fsdp", f"--train.optimizer={optimizer}"])
    full = ddp_losses(cfg, tmp_path)[0]
    part = interrupted_copy(tmp_path / "run", tmp_path / "part")
    one = Trainer(apply_overrides(cfg, ["--train.parallel=ddp"]), run_dir=part, resume=True, verbose=False).fit()
    assert one.losses == pytest.approx(full[4:], abs=tol)
    part2 = interrupted_copy(tmp_path / "run", tmp_path / "part2")
    out = tmp_path / "again"
    out.mkdir()
    for losses in ddp_losses(cfg, out, resume=part2):
        assert losses == pytest.approx(full[4:], abs=1e-6)
    # and the run continued in one process wrote ordinary checkpoints again
    assert (ckpt.find_checkpoint(part, "latest") / "model.safetensors").is_file()


def test_export_and_eval_of_a_sharded_run(tmp_path: Path) -> None:
    """`export` writes single-file checkpoints with the sharded run's weights; load_run reads
    the sharded run directly with the same weights; the copy resumes in one process."""
    from anyformer.cli import main

    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.parallel=fsdp"])
    full = ddp_losses(cfg, tmp_path)[0]
    sharded = load_run(tmp_path / "run", "latest", "cpu")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "plain")]) == 0
    plain = load_run(tmp_path / "plain", "latest", "cpu")
    assert (plain.checkpoint / "model.safetensors").is_file() and plain.state["step"] == 8
    for (name, a), (_, b) in zip(sharded.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert plain.cfg.train.parallel == "ddp"
    best = ckpt.find_checkpoint(tmp_path / "plain", "best")
    assert json.loads((tmp_path / "plain" / "checkpoints" / "best.json").read_text())["checkpoint"] == best.name
    # resuming the exported step-4 checkpoint in one process continues the sharded run's losses
    part = interrupted_copy(tmp_path / "run", tmp_path / "part")
    assert main(["export", str(part), str(tmp_path / "plain4")]) == 0
    resumed = Trainer(plain.cfg, run_dir=tmp_path / "plain4", resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full[4:], abs=1e-5)
    with pytest.raises(ValueError, match="not empty"):
        ckpt.export_run(tmp_path / "run", tmp_path / "plain")


def test_sharded_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.parallel=fsdp", "--train.max_steps=4"])
    ddp_losses(cfg, tmp_path)
    folder = ckpt.find_checkpoint(tmp_path / "run", "latest")
    other = build_model(apply_overrides(cfg, ["--model.dim=48", "--model.vocab_size=40"]).model)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model.*different config"):
        ckpt.load_weights(other, folder)


def test_fsdp_needs_a_process_group(tmp_path: Path) -> None:
    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node"):
        Trainer(cfg, verbose=False)
    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.fsdp_param_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="parallel=fsdp only"):
        Trainer(cfg, verbose=False)
    cfg = apply_overrides(tiny_run_config(tmp_path), ["--train.parallel=fsdp", "--train.fsdp_cpu_offload=true"])
    with pytest.raises(ConfigError, match="on the CPU already"):
        Trainer(cfg, verbose=False)


def test_a_global_batch_the_processes_cannot_split_is_refused(tmp_path: Path) -> None:
    cfg = tiny_run_config(tmp_path, "--train.batch_size=9", "--train.max_steps=2")
    with pytest.raises(Exception, match=r"batch_size=9 must be divisible by processes x grad_accum = 2 x 1"):
        ddp_losses(cfg, tmp_path)


# ------------------------------------------------------------------ activation checkpointing

_VARIANTS = [
    *[{"block__kind": kind} for kind in BLOCKS.names()],
    {"depth__kind": "denseformer"},
    {"depth__kind": "looped", "depth__options": {"loops": 2}},
    {"norm__placement": "post"},
]


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values() if not isinstance(x, dict)))
def test_activation_checkpointing_gives_the_same_gradients(arch: str, variant: dict) -> None:
    """Every block recomputed in the backward pass (dropout on: the recomputation must draw the
    same masks) gives the gradients of the stored-activation model, while fewer activations are
    kept for the backward pass."""
    torch.manual_seed(0)
    try:
        plain = build_model(tiny_config(arch, dropout=0.1, **variant)).train()
    except ConfigError as e:  # e.g. a block kind without cross-attention in an encoder-decoder
        pytest.skip(f"not a buildable model: {e}")
    checked = copy.deepcopy(plain)
    assert enable_activation_checkpointing(checked) == len(blocks_of(plain)) > 0
    x = torch.randint(0, 97, (2, 16))

    def grads(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run_model(model, x).float().square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]

    want, stored_plain = grads(plain)
    got, stored_checked = grads(checked)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    assert stored_checked < stored_plain
    # decoding and evaluation run the plain forward (no recomputation, no autograd)
    with torch.no_grad():
        torch.testing.assert_close(run_model(checked.eval(), x), run_model(plain.eval(), x))


def test_activation_checkpointing_in_training_equals_plain_training(tmp_path: Path) -> None:
    cfg = tiny_run_config(tmp_path, "--train.max_steps=4", "--model.dropout=0.1")
    plain = Trainer(cfg, run_dir=tmp_path / "a", verbose=False).fit()
    checked = Trainer(apply_overrides(cfg, ["--train.activation_checkpointing=true"]), run_dir=tmp_path / "b", verbose=False).fit()
    assert checked.losses == pytest.approx(plain.losses, abs=1e-6)


# ------------------------------------------------------------------ torchrun launches


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_two_node_launch_over_loopback_matches_one_process(tmp_path: Path) -> None:
    """Two torchrun invocations with --nnodes=2 (one process each) meet over a c10d rendezvous
    on 127.0.0.1 and train the same run as one process."""
    cfg = tiny_run_config(tmp_path, "--train.max_steps=6", "--train.eval_every=3")
    save_yaml(cfg, tmp_path / "cfg.yaml")
    single = Trainer(cfg, run_dir=tmp_path / "single", verbose=False).fit()
    port = _free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=anyformer-test", "-m", "anyformer", "train", str(tmp_path / "cfg.yaml"), "--quiet",
              "--out", str(tmp_path / "run")]
    nodes = [subprocess.Popen(_torchrun(*common), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs
    got = [r["loss"] for r in _records(tmp_path / "run", "train")]
    assert got == pytest.approx(single.losses, abs=1e-5)


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Under torchrun --max-restarts=1, SIGKILL of one rank of an FSDP run after its first
    checkpoint: torchrun restarts the workers, the trainer finds the launch's run folder and
    resumes from its latest checkpoint, and the metrics equal an uninterrupted run's."""
    cfg = tiny_run_config(tmp_path, "--train.max_steps=40", "--train.eval_every=2", "--train.keep_last=50",
                          "--train.parallel=fsdp")
    save_yaml(cfg, tmp_path / "cfg.yaml")
    args = ["--standalone", "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.1", "-m", "anyformer",
            "train", str(tmp_path / "cfg.yaml"), "--quiet"]
    ref = subprocess.run(_torchrun(*args, "--out", str(tmp_path / "ref")), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    agent = subprocess.Popen(_torchrun(*args, "--out", str(tmp_path / "run")), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not latest.is_file() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(agent.pid)
    for pid in workers:  # hold both ranks still, so the kill lands mid-run
        os.kill(pid, signal.SIGSTOP)
    killed_at = json.loads(latest.read_text())["step"]
    assert len(workers) == 2 and killed_at < 40, "the run finished before a rank could be killed"
    os.kill(workers[1], signal.SIGKILL)
    os.kill(workers[0], signal.SIGCONT)
    output = agent.communicate(timeout=300)[0]
    assert agent.returncode == 0, output
    assert not list(tmp_path.glob("run-*")), "the restart must continue the launch's run folder, not start a new one"
    want, got = _records(tmp_path / "ref", "train"), _records(tmp_path / "run", "train")
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    assert [r["val_loss"] for r in _records(tmp_path / "run", "eval")] == pytest.approx(
        [r["val_loss"] for r in _records(tmp_path / "ref", "eval")], abs=1e-6)
