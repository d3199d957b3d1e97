"""Reading a finished (or running) training run back: config, tokenizer and weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import load_yaml, save_yaml
from ..distributed import pick_device
from ..models.builders import build_model
from ..tasks import TASKS
from ..tokenizers import Tokenizer, load_tokenizer, save_tokenizer
from . import checkpoint as ckpt
from .config import RunConfig


@dataclass
class LoadedRun:
    """A run folder's config, tokenizer, model (eval mode) and the checkpoint it came from."""

    cfg: RunConfig
    tokenizer: Tokenizer | None  # None for a task whose data is not text (Task.has_tokenizer)
    model: nn.Module
    checkpoint: Path
    state: dict


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> LoadedRun:
    """Load the `best` or `latest` checkpoint of the run in `run_dir` (or `run_dir` is one
    checkpoint folder of a run, `RUN/checkpoints/step_...`), checksums verified."""
    run = Path(run_dir)
    if run.parent.name == "checkpoints" and (run / "state.json").is_file():  # one checkpoint of a run
        return _load(run.parent.parent, run, device)
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {which!r}")
    if run.is_dir() and (run / "config.yaml").is_file():
        return _load(run, ckpt.find_checkpoint(run, which), device)
    return _load(run, None, device)


def _load(run: Path, folder: Path | None, device: str) -> LoadedRun:
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist; give a folder written by `anyformer train`")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} has no config.yaml; it is not a run folder written by `anyformer train`")
    cfg = load_yaml(RunConfig, run / "config.yaml")
    if cfg.model.norm.kind == "rmsnorm" and cfg.model.norm.bias:
        # written when RMSNorm silently ignored a bias: the weights have none, so this is the same model
        cfg.model.norm.bias = False
    tok_file = run / "tokenizer.json"
    has_tokenizer = cfg.task.kind not in TASKS or TASKS.get(cfg.task.kind).has_tokenizer
    tokenizer = load_tokenizer(tok_file) if tok_file.is_file() or has_tokenizer else None
    assert folder is not None
    state = ckpt.read_state(folder)
    model = build_model(cfg.model)
    ckpt.load_weights(model, folder)
    model.to(pick_device(device)).eval()
    return LoadedRun(cfg, tokenizer, model, folder, state)


def autocast_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype a run trained its forward passes in."""
    return torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32


def write_run(folder: Path, cfg: RunConfig, model: nn.Module, tokenizer: Tokenizer | None, state: dict) -> None:
    """Write a run folder holding `model` as its one checkpoint (both best and latest), as
    `anyformer train` lays it out, for weights made another way (a compiled program): every
    command that reads a run then reads it. No optimizer state: it cannot be resumed."""
    cfg.validate()
    save_yaml(cfg, folder / "config.yaml")
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder / "tokenizer.json")
    ckpt.save_checkpoint(folder, 0, model, None, {}, state, keep_last=1, is_best=True)
