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

A run sharded with FSDP (train.parallel=fsdp) writes sharded checkpoints instead: `model/` and
`optimizer/` are torch.distributed.checkpoint folders (one file per process plus `.metadata`),
every process writing its own shards into the same temporary folder; state.json records
`"format": "sharded"` and the number of processes. They load at any number of processes
(resharded on load), in one plain process too (`load_weights`, `load_sharded_training_state`),
and `anyformer export` turns one into an ordinary checkpoint.
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
    _seal(tmp, step, state)
    return _publish(tmp, final, ckpts, step, state, keep_last=keep_last, is_best=is_best)


def _seal(tmp: Path, step: int, state: dict[str, Any]) -> None:
    """Write state.json (with the sha256 of every file, sub-folders included) and fsync all."""
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in paths}
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "files": files}, indent=1))
    for p in [*paths, tmp / "state.json"]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _publish(tmp: Path, final: Path, ckpts: Path, step: int, state: dict[str, Any], *, keep_last: int, is_best: bool) -> Path:
    """Rename a sealed temporary checkpoint into place, move the pointers, prune old ones."""
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


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint folder holds torch.distributed.checkpoint shards (an FSDP run's)."""
    return (folder / "model" / ".metadata").is_file()


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    keep_last: int = 2,
    is_best: bool = False,
) -> Path | None:
    """Every process writes its shards of the model and optimizer state (torch.distributed.
    checkpoint) into one temporary folder made by rank 0; rank 0 adds the RNG states and
    state.json and renames it into place. A collective: every process calls it. Returns the
    folder on rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    ckpts = Path(run_dir) / "checkpoints"
    final = ckpts / f"{STEP_PREFIX}{step:07d}"
    box: list[Any] = [None]
    if rank == 0:
        ckpts.mkdir(parents=True, exist_ok=True)
        box[0] = tempfile.mkdtemp(dir=ckpts, prefix=f".{final.name}.", suffix=".tmp")
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(model_sd, checkpoint_id=str(tmp / "model"))
    dcp.save(optim_sd, checkpoint_id=str(tmp / "optimizer"))
    dist.barrier()  # every shard is on disk before rank 0 seals the folder
    out = None
    if rank == 0:
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        state = {**state, "format": "sharded", "processes": dist.get_world_size()}
        _seal(tmp, step, state)
        out = _publish(tmp, final, ckpts, step, state, keep_last=keep_last, is_best=is_best)
    dist.barrier()
    return out


def _check_sharded_fits(path: Path, state_dict: dict[str, Any], what: str) -> None:
    """Raise CheckpointError when the tensors of a sharded checkpoint folder do not match the
    names and shapes of `state_dict` (a different model config)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is a broken checkpoint
        raise CheckpointError(f"cannot read the sharded {what} in {str(path)!r}: {e}; the checkpoint is corrupted") from None
    wanted = {k for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    stored = {k for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}
    missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
    shapes = [k for k in sorted(wanted & stored) if tuple(meta[k].size) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        detail = ", ".join(f"{k}: checkpoint {tuple(meta[k].size)} vs model {tuple(state_dict[k].shape)}" for k in shapes[:3])
        raise CheckpointError(
            f"sharded {what} in {str(path)!r} does not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}{', shapes ' + detail if detail else ''}); was the checkpoint made with a different config?"
        )


def load_sharded_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Load a sharded checkpoint's model and optimizer state into `model` and `optimizer`
    (sharded by FSDP over any number of processes, wrapped by nothing, or in one process:
    torch.distributed.checkpoint reshards on load); returns the saved RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # a parameter group without parameters (Muon's group for an untied LM head, when the head
    # is tied) cannot be named by the parameter names the sharded format keys groups by, so it
    # comes back bare: its hyperparameters are put back from the optimizer as built
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _check_sharded_fits(folder / "model", model_sd, "model")
    try:
        dcp.load(model_sd, checkpoint_id=str(folder / "model"))
        dcp.load(optim_sd, checkpoint_id=str(folder / "optimizer"))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        for group, built in zip(optimizer.param_groups, settings):
            for key, value in built.items():
                group.setdefault(key, value)
        return load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot restore the training state from the sharded checkpoint {str(folder)!r}: {e}") from None


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
    """Load the weights of a checkpoint into `model` (strict: every name must match):
    model.safetensors, or the shards of a sharded checkpoint (read whole, in this process)."""
    if is_sharded_checkpoint(folder):
        import torch.distributed.checkpoint as dcp

        state_dict = model.state_dict()
        _check_sharded_fits(folder / "model", state_dict, "model")
        try:
            dcp.load(state_dict, checkpoint_id=str(folder / "model"), no_dist=not torch.distributed.is_initialized())
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read the sharded weights in {str(folder)!r}: {e}; the checkpoint is corrupted") from None
        model.load_state_dict(state_dict)
        return
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
    if not (folder / "optimizer.pt").is_file() and (folder / "state.json").is_file() and "optimizer.pt" not in read_state(folder, verify=False).get("files", {}):
        raise CheckpointError(f"checkpoint {str(folder)!r} holds weights only, no training state (it was written by "
                              "`anyformer convert`, not by training): predict, eval and inspect read it; it cannot be resumed or exported")
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
        return load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot restore the training state from {str(folder)!r}: {e}") from None


def export_run(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy the run in `src` to `dst` with ordinary single-file checkpoints: its best and its
    latest checkpoint (sharded or not) are read whole in this process and written again as
    model.safetensors + optimizer.pt + rng.safetensors, with the same step, schedule and
    metrics; the config is set to train.parallel=ddp (FSDP options cleared), so the copy resumes
    in one process or under DDP, and `eval`, `generate`, `convert` and `from_pretrained` read it
    as any run. Returns the checkpoint folders written (best first)."""
    from ..config import load_yaml, save_yaml
    from ..files import staged_folder
    from ..models.builders import build_model
    from .config import RunConfig
    from .optim import build_optimizer

    src, dst = Path(src), Path(dst)
    if not (src / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(src)!r} is not a run folder (no config.yaml); give a folder written by `anyformer train`")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{str(dst)!r} exists and is {'a file' if not dst.is_dir() else 'not empty'}; give a new folder")
    if dst.resolve() == src.resolve():
        raise ValueError("SRC and DST are the same folder; give a new DST")
    cfg = load_yaml(RunConfig, src / "config.yaml")
    t = cfg.train
    t.parallel, t.fsdp_param_dtype, t.fsdp_reduce_dtype, t.fsdp_cpu_offload = "ddp", None, None, False
    folders = []
    for which in ("best", "latest"):
        folder = find_checkpoint(src, which)
        if folder not in folders:
            folders.append(folder)
    written = []
    with staged_folder(dst) as tmp:  # the copy appears whole or not at all
        for i, folder in enumerate(folders):
            state = read_state(folder)
            model = build_model(cfg.model)
            optimizer = build_optimizer(model, t)
            if is_sharded_checkpoint(folder):
                rng = load_sharded_training_state(folder, model, optimizer)
            else:
                load_weights(model, folder)
                rng = load_training_state(folder, optimizer)
            step = int(state["step"])
            kept = {k: v for k, v in state.items() if k not in ("files", "format", "processes", "step")}
            saved = save_checkpoint(tmp, step, model, optimizer, rng, kept, keep_last=2, is_best=i == 0)
            written.append(dst / saved.relative_to(tmp))
        save_yaml(cfg, tmp / "config.yaml")
        for name in ("tokenizer.json", "metrics.jsonl", "loss.png"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return written
