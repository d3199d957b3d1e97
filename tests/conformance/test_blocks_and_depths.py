"""Every registered block kind and depth wiring, in every combination, on the properties every
variant must keep: gradients reach every parameter, causality, and cached decoding (plain and
fast path) equal to a full recompute, and the summary's FLOPs within 10% of torch's FLOP counter
(an encoder's forward, a decoder's decoding steps). New registrations are picked up
automatically."""

from __future__ import annotations

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.generation import generate
from anyformer.models import BLOCKS, DEPTHS

from ..helpers import flops_against_counter

COMBOS = [(b, d) for b in BLOCKS.names() for d in DEPTHS.names() if not b.startswith("ext_") and not d.startswith("ext_")]


def model_of(block: str, depth: str, arch: str = "decoder") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=40, dim=32, num_layers=2, max_seq_len=40, attention={"num_heads": 4},
                      block={"kind": block}, depth={"kind": depth})
    return build_model(cfg)


@pytest.mark.parametrize("block,depth", COMBOS)
def test_gradients_reach_every_parameter(block: str, depth: str) -> None:
    for arch in ("decoder", "encoder"):
        model = model_of(block, depth, arch)
        out = model(torch.randint(0, 40, (2, 7)))
        out.float().pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{arch}: no gradient for {missing}"


@pytest.mark.parametrize("block,depth", COMBOS)
def test_causal_and_cached_decoding_equals_recompute(block: str, depth: str) -> None:
    model = model_of(block, depth).eval()
    a = torch.randint(0, 40, (1, 10))
    b = a.clone()
    b[:, 6:] = (b[:, 6:] + 1) % 40
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :6], model(b)[:, :6], atol=1e-5, rtol=0)
        tokens = a[:, :4]
        for _ in range(8):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    for compile in (False, True):
        assert torch.equal(generate(model, a[:, :4], max_new_tokens=8, compile=compile), tokens)


@pytest.mark.parametrize("block,depth", COMBOS)
def test_summary_flops_match_the_flop_counter(block: str, depth: str) -> None:
    for arch in ("decoder", "encoder"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, vocab_size=40, dim=32, num_layers=2, max_seq_len=40, attention={"num_heads": 4, "kernel": "eager"},
                          block={"kind": block}, depth={"kind": depth}, head={"kind": "mlm"} if arch == "encoder" else {})
        model = build_model(cfg).eval()
        ours, measured = flops_against_counter(model, (torch.randint(0, 40, (1, 40)),), 40)
        assert 0.9 * measured <= ours <= 1.1 * measured, (arch, ours, measured)
