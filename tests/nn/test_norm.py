"""RMSNorm: equal to torch.nn.RMSNorm and to the formula in float64, refusing a bias (and a
config asking for one), while run folders written with the ignored bias still load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import build



def test_rmsnorm_refuses_a_bias_and_matches_torch() -> None:
    from anyformer.nn.norm import RMSNorm

    with pytest.raises(ValueError, match=r"RMSNorm has no bias.*model\.norm\.bias=false.*layernorm"):
        RMSNorm(8, bias=True)
    ours = RMSNorm(8, eps=1e-5)
    ref = torch.nn.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(8))
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), ref(x))
    assert [name for name, _ in ours.named_parameters()] == ["weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_formula_in_float64(dtype: torch.dtype) -> None:
    """fp32 (one fused call) and bf16 (fp32 statistics, one rounding) against the formula."""
    from anyformer.nn.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (torch.randn(4, 7, 48) * 3).to(dtype)
    xd, wd = x.double(), norm.weight.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(norm(x).double(), want.to(dtype).double() if dtype != torch.float32 else want, **tol)


def test_model_config_asking_rmsnorm_for_a_bias_is_refused() -> None:
    with pytest.raises(ValueError, match="bias"):
        build(norm__kind="rmsnorm", norm__bias=True)
    model = build(norm__kind="rmsnorm", norm__bias=False)
    assert not any(n.endswith("norm.bias") for n, _ in model.named_parameters())
    with_bias = build(norm__kind="layernorm", norm__bias=True)
    assert any(n.endswith("norm.bias") for n, _ in with_bias.named_parameters())


def test_run_folders_written_with_an_ignored_rmsnorm_bias_still_load(learned_run: SimpleNamespace, tmp_path: Path) -> None:
    """Run folders saved before RMSNorm refused a bias say `norm: {kind: rmsnorm, bias: true}`;
    their weights have no bias, so they load as the same model."""
    import shutil

    import yaml

    from anyformer.training.run import load_run

    run = shutil.copytree(learned_run.dir, tmp_path / "old")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["norm"] = {**cfg["model"]["norm"], "kind": "rmsnorm", "bias": True}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_run(learned_run.dir).cfg.model.norm.kind == "rmsnorm"  # the run trained with one
    r = load_run(run)
    assert r.cfg.model.norm.bias is False
    x = torch.randint(0, r.cfg.model.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), load_run(learned_run.dir).model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_of_low_precision_input_with_fp32_weights_matches_torch(bias: bool) -> None:
    """bf16 activations through fp32 weights (mixed precision): fp32 statistics and affine,
    the bias included, rounded once, as torch.nn.LayerNorm computes on the fp32 input."""
    from anyformer.nn.norm import LayerNorm

    gen = torch.Generator().manual_seed(0)
    ours = LayerNorm(16, bias=bias)
    ref = torch.nn.LayerNorm(16, bias=bias)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=gen))
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.copy_(torch.randn(16, generator=gen))
            ref.bias.copy_(ours.bias)
    x = (torch.randn(3, 5, 16, generator=gen) * 3 + 1).bfloat16()
    got = ours(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref(x.float()).bfloat16(), rtol=0, atol=0)
