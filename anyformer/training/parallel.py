"""How a model is spread over the processes of a run, and activation checkpointing.

`train.parallel`:
- `ddp`: every process holds the whole model; DistributedDataParallel averages the gradients
  (nothing to do in one process).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every block of every stack, then on
  the root (embeddings, final norm, head): each process keeps 1/N of every parameter, of its
  gradient and of its optimizer state, and gathers a block's parameters just for its forward
  and backward. The module keeps its class and its parameter names (they become DTensors), so
  the same model code runs sharded or not.

`train.activation_checkpointing`: each block's forward runs under
`torch.utils.checkpoint.checkpoint` while gradients are being recorded, so its activations are
recomputed in the backward pass instead of stored. The block object and its parameter names
stay as they are (the block's `forward` is wrapped on the instance), so checkpoints, FSDP and
every block kind work unchanged; decoding (a cache is passed) runs the plain forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..distributed import DistEnv
from ..dtypes import DTYPES
from ..models.common import Stack
from .config import TrainConfig


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Every block of every stack of the model (a decoder's, an encoder's, both of an
    encoder-decoder's), each once, in module order."""
    seen: set[int] = set()
    out = []
    for mod in model.modules():
        if isinstance(mod, Stack):
            for block in mod.blocks:
                if id(block) not in seen:
                    seen.add(id(block))
                    out.append(block)
    return out


def _checkpointed(forward: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        if torch.is_grad_enabled() and kwargs.get("cache") is None:
            # use_reentrant=False: keyword arguments and non-tensor inputs pass through; the RNG
            # state is replayed, so dropout draws the same masks in the recomputation
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run.activation_checkpointed = True  # type: ignore[attr-defined]
    return run


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every block's activations in the backward pass; returns the number of blocks.
    Raises ConfigError for a model without blocks (nothing to checkpoint)."""
    blocks = blocks_of(model)
    if not blocks:
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} has no stack of blocks to checkpoint")
    for block in blocks:
        if not getattr(block.forward, "activation_checkpointed", False):
            block.forward = _checkpointed(block.forward)  # type: ignore[method-assign]
    return len(blocks)


def check_parallel(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse settings that cannot work in this launch, saying what to run instead."""
    if cfg.fsdp_cpu_offload and env.device.type == "cpu":
        raise ConfigError("train.fsdp_cpu_offload keeps the shards of a GPU run in CPU memory; this run is on the CPU "
                          "already: leave it false")
    if cfg.parallel == "fsdp" and not torch.distributed.is_initialized():
        raise ConfigError(
            "train.parallel=fsdp shards the model over processes started by torchrun, but this is a plain "
            "single process; launch it as  torchrun --nproc-per-node=N -m anyformer train CONFIG  "
            "(N >= 1), or use train.parallel=ddp"
        )
    if cfg.parallel != "fsdp" and (cfg.fsdp_param_dtype or cfg.fsdp_reduce_dtype or cfg.fsdp_cpu_offload):
        raise ConfigError("train.fsdp_param_dtype, fsdp_reduce_dtype and fsdp_cpu_offload apply to train.parallel=fsdp only")


def shard_model(model: nn.Module, cfg: TrainConfig) -> None:
    """FSDP2 in place: fully_shard on each block, then on the root module."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.fsdp_param_dtype] if cfg.fsdp_param_dtype else None,
        reduce_dtype=DTYPES[cfg.fsdp_reduce_dtype] if cfg.fsdp_reduce_dtype else None,
    )
    kwargs: dict[str, Any] = {"mp_policy": policy}
    if cfg.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks_of(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard was applied to the model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """Set the model up for this run: activation checkpointing, then sharding (fsdp, in place:
    the returned module is `model`) or a DDP wrapper (several processes), then torch.compile.
    The optimizer must be built after this (FSDP replaces the parameters by DTensors)."""
    check_parallel(cfg, env)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    fwd: nn.Module = model
    if cfg.parallel == "fsdp":
        shard_model(model, cfg)
    elif env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        fwd = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        fwd = torch.compile(fwd)  # type: ignore[assignment]
    return fwd


def local(value: Tensor) -> Tensor:
    """A plain tensor: the full value of a DTensor (a collective: every process must call it),
    the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
