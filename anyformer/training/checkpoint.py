"""Checkpoints without pickled objects, written atomically, keeping the last K and the best.

A checkpoint is a folder `checkpoints/step_XXXXXXX/` holding
    model.safetensors      weights (tied tensors stored once; safetensors.torch.save_model)
    optimizer.pt           the optimizer state dict (tensors and numbers only; read with
                           torch.load(weights_only=True))
    rng.safetensors        RNG states (torch CPU, CUDA, the data sampler) as uint8 tensors
    state.json             step, schedule horizon, best loss, ... and a sha256 of every file
It is written in a temporary folder and renamed into place (os.replace), so a process killed
while writing leaves the previous checkpoints intact. `latest.json` and `best.json` point at
checkpoints and are themselves replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync it, and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_files(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, rng: dict[str, torch.Tensor]) -> None:
    """The payload files of a checkpoint (split out so tests can interrupt it)."""
    save_model(model, str(folder / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in rng.items()}, str(folder / "rng.safetensors"))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    keep_last: int = 2,
    is_best: bool = False,
) -> Path:
    """Write checkpoint `step` atomically, update latest/best pointers, prune old ones."""
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"{STEP_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".{final.name}.", suffix=".tmp"))
    _write_files(tmp, model, optimizer, rng)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "files": files}, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(ckpts / "latest.json", {"checkpoint": final.name, "step": step})
    if is_best:
        write_json_atomic(ckpts / "best.json", {"checkpoint": final.name, "step": step, "val_loss": state.get("best_val_loss")})
    _prune(ckpts, keep_last)
    return final


def _pointer(ckpts: Path, name: str) -> str | None:
    try:
        return json.loads((ckpts / name).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune(ckpts: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints and the best one; clear stale temps."""
    steps = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    keep = {p.name for p in steps[-keep_last:]} | {_pointer(ckpts, "best.json")}
    for p in steps:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpts.glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """The folder of the `latest` or `best` checkpoint of a run (falling back to the newest
    complete one when the pointer file is missing or unreadable)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    ckpts = run / "checkpoints"
    name = _pointer(ckpts, f"{which}.json") if ckpts.is_dir() else None
    if name and (ckpts / name / "state.json").is_file():
        return ckpts / name
    complete = sorted(p for p in ckpts.glob(f"{STEP_PREFIX}*") if (p / "state.json").is_file()) if ckpts.is_dir() else []
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {str(ckpts)!r}; train first (anyformer train) or check the path")
    return complete[-1]


def read_state(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    """state.json of a checkpoint, with every file checked against its recorded sha256."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no readable state.json ({e}); it is incomplete or corrupted") from None
    if verify:
        for name, digest in state.get("files", {}).items():
            p = folder / name
            if not p.is_file():
                raise CheckpointError(f"checkpoint {str(folder)!r} is missing {name}; it is incomplete")
            if _sha256(p) != digest:
                raise CheckpointError(
                    f"checkpoint file {str(p)!r} does not match its recorded checksum: it is corrupted or "
                    "truncated; use another checkpoint (e.g. --checkpoint best) or retrain"
                )
    return state


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load model.safetensors of a checkpoint into `model` (strict: every name must match)."""
    path = folder / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read weights {str(path)!r}: {e}; the file is corrupted or truncated") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {str(path)!r} do not fit this model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); was the checkpoint made with a different config?"
        )


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Load the optimizer state in place and return the saved RNG states."""
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
        return load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot restore the training state from {str(folder)!r}: {e}") from None
