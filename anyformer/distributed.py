"""Process-group setup for data-parallel work launched by torchrun (or one process), and the
collectives every layer uses (means, broadcasts, even evaluation shares)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """This process's place in the job: rank, world size, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": the local CUDA device when there is one, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=auto or cpu")
    return dev


def setup(device: str = "auto", *, group: bool = False) -> DistEnv:
    """Join the process group when launched by torchrun with several processes (WORLD_SIZE > 1),
    or with one when `group` asks for it (FSDP shards over a group even of one): nccl on GPU,
    gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ
    if (world > 1 or (group and launched)) and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, store=_attempt_store(rank, world))
    return DistEnv(rank, world, local_rank, dev)


def _attempt_store(rank: int, world: int) -> dist.Store | None:
    """Under torchrun (TORCHELASTIC_RESTART_COUNT set), the rendezvous store seen through a
    prefix of this attempt: workers restarted after a failure (`--max-restarts`) reach the same
    store as the attempt before them, whose keys (the processes' addresses) must not be read
    again. None elsewhere (init_process_group reads MASTER_ADDR/PORT itself)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it; else rank 0 does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(minutes=10),
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"anyformer/attempt_{attempt}", store)


def teardown() -> None:
    """Leave the process group if one was joined. Unreachable objects that hold the group (a
    DDP wrapper's reducer and its pending work) are collected first, while the group is alive:
    left to the interpreter's exit, their destruction can abort the process."""
    if dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when there is one)."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world
    return value


def broadcast_float(value: float, env: DistEnv) -> float:
    """Rank 0's value of a float, on every process."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.broadcast(t, 0)
    return float(t.item())


def split_evenly(share: Any, total: int, batch: int, env: DistEnv) -> list[Any]:
    """This process's share of `total` evaluation items (a tensor or list, the items
    `rank::world`) cut into batches of at most about `batch` items, the same NUMBER of batches
    on every process: under FSDP every forward is a collective, so a process with one item
    fewer must not run one forward fewer. Batches are near-equal slices of the share."""
    most = -(-total // env.world)  # the largest share
    parts = max(1, -(-most // batch))
    n = len(share)
    return [share[i * n // parts : (i + 1) * n // parts] for i in range(parts)]
