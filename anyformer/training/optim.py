"""Optimizers with weight-decay groups (AdamW, or Muon for hidden matrices plus AdamW for the
rest), and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices of linear layers decay; norms, biases and embeddings do not.

    Tied weights appear once (in the group of their first owner, the embedding).
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for mod in model.modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if isinstance(mod, nn.Linear) and p.dim() == 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_hidden_matrix(name: str, mod: nn.Module, p: Tensor) -> bool:
    """A 2-D weight of a linear layer inside the stack (not the token embedding or LM head)."""
    return isinstance(mod, nn.Linear) and p.dim() == 2 and not name.startswith(("lm_head", "embed"))


def muon_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three groups: hidden matrices for Muon (decayed), then AdamW groups for the other linear
    matrices (decayed: an untied LM head) and for everything else (embeddings, norms, biases).

    `lr_mult` scales the scheduled learning rate per group: Muon's step is an orthogonal
    matrix, so it runs at `muon_lr` where AdamW runs at `lr`.
    """
    seen: set[int] = set()
    muon, decay, no_decay = [], [], []
    for mod_name, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if _is_hidden_matrix(mod_name, mod, p):
                muon.append(p)
            elif isinstance(mod, nn.Linear) and p.dim() == 2:
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": muon, "use_muon": True, "weight_decay": cfg.weight_decay, "lr_mult": cfg.muon_lr / cfg.lr},
        {"params": decay, "use_muon": False, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "use_muon": False, "weight_decay": 0.0, "lr_mult": 1.0},
    ]


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """An approximately orthogonal matrix with g's row and column spaces (U V^T of g's SVD,
    singular values pushed towards 1), by a quintic Newton-Schulz iteration in bf16.

    The polynomial a x + b x^3 + c x^5 with (a, b, c) = (3.4445, -4.7750, 2.0315) is tuned to
    raise small singular values fast; it leaves them in roughly [0.7, 1.2] rather than exactly
    at 1, which is what the optimizer needs. g: (..., o, k) -> (..., o, k), each matrix of a
    batch on its own.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT  # iterate on the short side: x x^T is min(o, k) square
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)  # spectral <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


def _whole(t: Tensor) -> Tensor:
    """The whole matrix of a sharded parameter's tensor (FSDP: a DTensor; gathered from every
    process, a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shaped_like(u: Tensor, p: Tensor) -> Tensor:
    """u (a whole matrix, the same on every process) laid out like parameter p: this process's
    shard when p is a DTensor (taken locally, no communication), else u."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None)
    return u


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for groups with `use_muon`, AdamW for the others.

    Muon: heavy-ball momentum with a Nesterov look-ahead, then the update direction is
    replaced by its orthogonalisation (`orthogonalize`) scaled by sqrt(max(1, o / k)), with
    decoupled weight decay. AdamW groups follow torch.optim.AdamW's update.
    Under FSDP the orthogonalisation needs the whole matrix: each process gathers the
    look-ahead of a sharded matrix, iterates on it (identically on every process) and applies
    its own shard of the result.
    The state holds tensors and numbers only, so checkpoints load with weights_only=True.
    """

    def __init__(self, groups: list[dict], *, lr: float, momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, ns_steps=ns_steps, use_muon=False,
                        weight_decay=0.0, lr_mult=1.0)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if wd and params:
                torch._foreach_mul_(params, 1 - lr * wd)
            if group["use_muon"]:
                self._muon_step(params, group)
            else:
                self._adamw_step(params, group)
        return loss

    def _muon_step(self, params: list[Tensor], group: dict) -> None:
        beta, lr = group["momentum"], group["lr"]
        by_shape: dict[tuple, list[Tensor]] = {}
        looks = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(beta).add_(p.grad)
            looks[p] = p.grad.add(buf, alpha=beta)  # Nesterov look-ahead
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        for (shape, _, _), same in by_shape.items():  # one batched iteration per shape: fewer, larger products
            updates = orthogonalize(torch.stack([_whole(looks[p]) for p in same]), group["ns_steps"])
            scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
            for p, u in zip(same, updates):
                p.add_(_shaped_like(u, p), alpha=scale)

    def _adamw_step(self, params: list[Tensor], group: dict) -> None:
        b1, b2 = group["betas"]
        for p in params:
            g, state = p.grad, self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(g, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over `param_groups`, or Muon over `muon_param_groups`
    (train.optimizer)."""
    if cfg.optimizer == "muon":
        return Muon(muon_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled learning rate on every group (times the group's `lr_mult`, if any)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


WARMUP_FRACTION = 0.2  # warmup never takes more than this share of the planned steps


def warmup_of(cfg: TrainConfig, horizon: int) -> int:
    """Warmup steps of a run planned to `horizon` steps: `warmup_steps`, capped at
    WARMUP_FRACTION of the horizon so that a short run leaves warmup."""
    return max(1, min(cfg.warmup_steps, int(WARMUP_FRACTION * horizon))) if cfg.warmup_steps > 0 else 0


def lr_at(step: int, cfg: TrainConfig, horizon: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup (see `warmup_of`), then
    cosine to lr * min_lr_ratio at step `horizon` (and flat after it)."""
    warmup = warmup_of(cfg, horizon)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, horizon - warmup)
    progress = min(1.0, (step - warmup) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1.0 + math.cos(math.pi * progress))
