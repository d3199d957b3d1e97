"""Optimizers: Muon's orthogonalisation, its AdamW half against torch's AdamW, groups and schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from anyformer.models.builders import build_model
from anyformer.nn.norm import LayerNorm, RMSNorm
from anyformer.training.config import TrainConfig, default_run_config
from anyformer.training.optim import Muon, build_optimizer, lr_at, muon_param_groups, orthogonalize, param_groups, set_lr
from tests.training_helpers import tiny_config


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_orthogonalize_pushes_singular_values_towards_one(shape) -> None:
    torch.manual_seed(0)
    # an ill-conditioned matrix: singular values spread over two orders of magnitude (five
    # iterations lift values down to about 1e-3 of the Frobenius norm)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -2, k)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    o = orthogonalize(g).float()
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    # same singular vectors: o is close to U V^T up to the per-direction scale
    uvt = u[:, :k] @ v[:, :k].T
    cos = (o * uvt).sum() / (o.norm() * uvt.norm())
    assert cos > 0.97


def test_adamw_groups_follow_torch_adamw() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ours = Muon([{"params": list(a.parameters()), "use_muon": False, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 8)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_muon_groups_and_learning_rates() -> None:
    cfg = default_run_config()
    model = build_model(dataclasses.replace(cfg.model, vocab_size=50, num_layers=2))
    t = dataclasses.replace(cfg.train, optimizer="muon", lr=2e-3, muon_lr=0.02)
    groups = muon_param_groups(model, t)
    muon_ids = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_ids}
    assert names and all(n.startswith("stack.") and n.endswith("weight") for n in names)
    assert id(model.embed.tokens.weight) not in muon_ids  # the (tied) embedding stays with AdamW
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, t)
    set_lr(opt, lr_at(10_000, t, horizon=100))  # past the horizon: the floor
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * t.min_lr_ratio)
    assert opt.param_groups[2]["lr"] == pytest.approx(2e-3 * t.min_lr_ratio)


def test_muon_trains_a_regression_and_beats_its_start() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    target = nn.Sequential(nn.Linear(16, 1))
    t = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    opt = build_optimizer(net, t)
    x = torch.randn(256, 16)
    y = target(x).detach()
    first = None
    for _ in range(200):
        loss = (net(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_lr_schedule_shape() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_weight_decay_groups(tmp_path) -> None:
    model = build_model(tiny_config(tmp_path).model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})  # tied weight once
    assert id(model.embed.tokens.weight) in {id(p) for p in no_decay["params"]}
    norms = [m.weight for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))]
    assert norms and all(id(w) in {id(p) for p in no_decay["params"]} for w in norms)
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not model.embed.tokens.weight]
    assert all(id(w) in {id(p) for p in decay["params"]} for w in linears)
