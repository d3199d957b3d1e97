"""Shared pieces of the training tests: a small real corpus and a tiny run config."""

from __future__ import annotations

from pathlib import Path

from anyformer.config import apply_overrides
from anyformer.data.text import markdown_play_to_text, shakespeare_dir
from anyformer.training.config import RunConfig, default_run_config

PLAYS = ["tragedies/macbeth.md", "comedies/twelfth-night.md", "roman/julius-caesar.md"]


def write_corpus(folder: Path, chars: int = 40_000) -> Path:
    """Three plays' plain text (first `chars` characters each) as .txt files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLAYS:
        text = markdown_play_to_text((shakespeare_dir() / name).read_text(encoding="utf-8"))[:chars]
        (folder / (Path(name).stem + ".txt")).write_text(text, encoding="utf-8")
    return folder


def tiny_config(tmp: Path, *extra: str) -> RunConfig:
    """A run config with a 2-layer, 32-wide model on `write_corpus` text, fp32, AdamW, few steps."""
    corpus = write_corpus(tmp / "corpus")
    overrides = [
        "--data.corpus=text", f"--data.path={corpus}", f"--data.cache_dir={tmp / 'cache'}", "--data.val_fraction=0.3",
        "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64",
        "--model.max_seq_len=32", "--train.seq_len=32", "--train.batch_size=8", "--train.max_steps=8",
        "--train.max_minutes=null", "--train.warmup_steps=2", "--train.eval_every=4", "--train.eval_batches=2",
        "--train.log_every=2", "--train.dtype=float32", "--train.optimizer=adamw", "--train.samples=0", "--train.lr=3e-3",
        f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ]
    return apply_overrides(default_run_config(), overrides)


def base_config() -> RunConfig:
    """The default run config (for tests that only read it)."""
    return RunConfig()


def interrupted_copy(full: Path, part: Path, *, at: int = 4, end: int = 8) -> Path:
    """A copy of the finished run `full` as if it had been stopped right after its step-`at`
    checkpoint (the step-`end` checkpoint removed, `latest` pointing at step `at`)."""
    import json
    import shutil

    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / f"step_{end:07d}")
    (part / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": f"step_{at:07d}", "step": at}))
    return part


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_path: str, out: str, resume: str | None = None) -> None:
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from anyformer.config import load_yaml
    from anyformer.training import Trainer
    from anyformer.training.config import RunConfig
    from anyformer.distributed import teardown

    cfg = load_yaml(RunConfig, cfg_path)
    run_dir = Path(resume) if resume else Path(out) / "run"
    result = Trainer(cfg, run_dir=run_dir, resume=resume is not None, verbose=False).fit()
    Path(out, f"losses{rank}.json").write_text(json.dumps(result.losses))
    del result
    teardown()
    # the numbers are written: skip the interpreter's own finalization, where gloo's threads
    # have aborted a process once in CI after its work was done (the exit path of a real run,
    # `anyformer train` under torchrun, is tested in tests/training/test_scale_out.py)
    os._exit(0)


def ddp_losses(cfg: RunConfig, out: Path, world: int = 2, resume: Path | None = None) -> list[list[float]]:
    """Train `cfg` with `world` gloo processes into `out/run` (or resume the run in `resume`);
    each rank's training losses."""
    import json

    import torch.multiprocessing as mp

    from anyformer.config import save_yaml

    cfg_path = out / "cfg.yaml"
    save_yaml(cfg, cfg_path)
    args = (world, _free_port(), str(cfg_path), str(out), None if resume is None else str(resume))
    mp.spawn(_ddp_worker, args=args, nprocs=world, join=True)
    return [json.loads((out / f"losses{rank}.json").read_text()) for rank in range(world)]


def check_ddp_matches_one_process(cfg: RunConfig, tmp: Path, metrics: tuple[str, ...]) -> None:
    """Train `cfg` in one process (tmp/single) and in two gloo processes (tmp/run): every
    rank's training losses and the final validation `metrics` must equal one process's."""
    import json

    import pytest

    from anyformer.training import Trainer

    single = Trainer(cfg, run_dir=tmp / "single", verbose=False).fit()
    for losses in ddp_losses(cfg, tmp):
        assert losses == pytest.approx(single.losses, abs=1e-5)

    def last_eval(run: Path) -> dict:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]

    one, two = last_eval(tmp / "single"), last_eval(tmp / "run")
    for key in metrics:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
