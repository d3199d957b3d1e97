"""The CUDA attention path (anyformer.nn.attention.flex): FlexAttention with every registered
sparse kind's pattern, ALiBi and T5 biases, masks and grouped heads, against the CPU reference
kernels. FlexAttention runs forward on the CPU (unfused), so the forward checks run everywhere;
the backward, bf16 and compiled-training checks need CUDA and are skipped without it."""

from __future__ import annotations

import pytest
import torch

from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.attention.block_bias import PositionalBlockBias
from anyformer.nn.attention.chunked import chunked_attention
from anyformer.nn.attention.flex import cuda_attention, flex_attention_call, flex_available
from anyformer.nn.attention.kernels import eager_attention
from anyformer.nn.attention.patterns import BlockLayout, Pattern

from tests.helpers import build

pytestmark = pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: FlexAttention has no CPU backward and no fused CPU kernel")


SMALL = {"sliding_window": {"window": 6}, "strided": {"stride": 4}, "fixed": {"stride": 4, "num_summary": 1},
         "block_local": {"block": 8}, "dilated": {"window": 3, "dilation": 2}, "lambda_shaped": {"window": 6, "num_global": 2}}


def sparse_patterns() -> dict[str, Pattern]:
    """The pattern of every registered attention kind that has one (small windows, so that a
    40-token sequence is really sparse)."""
    out = {}
    for kind in ATTENTIONS.names():
        model = build(attention__kind=kind, attention__options=SMALL.get(kind, {}))
        pattern = next((m.kernel.pattern for m in model.modules() if getattr(getattr(m, "kernel", None), "pattern", None)), None)
        if pattern is not None:
            out[kind] = pattern
    return out


PATTERNS = sparse_patterns()


def test_every_sparse_kind_is_covered() -> None:
    assert {"sliding_window", "strided", "fixed", "block_local", "dilated", "lambda_shaped"} <= set(PATTERNS)


def _positional(kind: str):  # type: ignore[no-untyped-def]
    model = build(positional__kind=kind, attention__num_heads=4)
    if kind == "t5":  # a trained-looking table, not the zeros of a fresh one
        with torch.no_grad():
            for p in model.positional.parameters():
                p.normal_()
    return model.positional


def _inputs(b: int, h: int, g: int, n: int, m: int, d: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=gen), torch.randn(b, g, m, d, generator=gen), torch.randn(b, g, m, d, generator=gen))


@pytest.mark.parametrize("kind", sorted(PATTERNS))
@pytest.mark.parametrize("positional", ["none", "alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_the_reference_for_every_pattern_and_bias(kind: str, positional: str, causal: bool) -> None:
    """FlexAttention's output under a kind's pattern, a positional bias and causality equals the
    eager kernel with the same dense mask and bias (and the chunked CPU kernel)."""
    pattern = PATTERNS[kind]
    b, h, g, n = 2, 4, 2, 40
    q, k, v = _inputs(b, h, g, n, n)
    pos = torch.arange(n)[None].expand(b, n)
    block_bias = None if positional == "none" else PositionalBlockBias(_positional(positional), pos, pos)
    got = flex_attention_call(q, k, v, pattern=pattern, causal=causal, block_bias=block_bias, block_size=16)
    dense_bias = None if block_bias is None else block_bias(0, n, 0, n)
    want = eager_attention(q, k, v, mask=pattern.dense(n, n), bias=dense_bias, causal=causal)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    chunked = chunked_attention(q, k, v, pattern=pattern, causal=causal, block_bias=block_bias)
    torch.testing.assert_close(got, chunked, atol=2e-5, rtol=1e-4)


def test_flex_with_cached_keys_masks_and_dense_bias() -> None:
    """Queries that are the last n of m keys (a KV cache), a padding mask per batch row, a user
    float bias per head, ALiBi on shifted positions (the dense fallback for the positional
    bias), and a row with every key masked (zeros, as the reference)."""
    b, h, g, n, m = 2, 4, 4, 8, 24
    q, k, v = _inputs(b, h, g, n, m, seed=1)
    pattern = PATTERNS["sliding_window"]
    mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
    mask[1, ..., :20] = False
    bias = torch.randn(1, h, n, m)
    q_pos = torch.arange(m - n, m)[None].expand(b, n) + torch.tensor([[0], [3]])
    k_pos = torch.arange(m)[None].expand(b, m) + torch.tensor([[0], [3]])
    block_bias = PositionalBlockBias(_positional("alibi"), q_pos, k_pos)
    got = flex_attention_call(q, k, v, pattern=pattern, mask=mask, bias=bias, causal=True, block_bias=block_bias, block_size=16)
    dense = pattern.dense(n, m) & mask
    want = eager_attention(q, k, v, mask=dense, bias=bias + block_bias(0, n, 0, m), causal=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    empty = torch.zeros(b, 1, 1, m, dtype=torch.bool)
    none_visible = flex_attention_call(q, k, v, mask=empty, block_size=16)
    assert torch.equal(none_visible, torch.zeros_like(none_visible))


def test_flex_with_positions_that_are_not_consecutive_reads_the_whole_bias() -> None:
    """Positions with a gap (a row that skipped two positions): no distance table applies, and
    FlexAttention adds the positional bias computed for every (query, key) pair."""
    b, h, g, n = 1, 4, 2, 24
    q, k, v = _inputs(b, h, g, n, n, seed=2)
    pos = torch.cat([torch.arange(10), torch.arange(12, 26)])[None]
    block_bias = PositionalBlockBias(_positional("alibi"), pos, pos)
    got = flex_attention_call(q, k, v, causal=True, block_bias=block_bias, block_size=16)
    want = eager_attention(q, k, v, bias=block_bias(0, n, 0, n), causal=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, flex_attention_call(q, k, v, causal=True, block_size=16), atol=1e-3)


def test_a_block_layout_pattern_uses_its_dense_mask() -> None:
    layout = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])
    pattern = BlockLayout(layout, 8)
    q, k, v = _inputs(1, 2, 2, 24, 24, seed=2)
    got = flex_attention_call(q, k, v, pattern=pattern, block_size=16)
    torch.testing.assert_close(got, eager_attention(q, k, v, mask=pattern.dense(24, 24)), atol=2e-5, rtol=1e-4)


def test_plain_attention_takes_sdpa_and_dropout_with_a_pattern_falls_back() -> None:
    q, k, v = _inputs(1, 2, 1, 16, 16, seed=3)
    plain = cuda_attention(q, k, v, pattern=None, mask=None, bias=None, causal=True, scale=None, dropout=0.0, block_bias=None)
    torch.testing.assert_close(plain, eager_attention(q, k, v, causal=True), atol=2e-5, rtol=1e-4)
    assert cuda_attention(q, k, v, pattern=PATTERNS["strided"], mask=None, bias=None, causal=True, scale=None,
                          dropout=0.1, block_bias=None) is None


# ------------------------------------------------------------------ CUDA only


@needs_cuda
@pytest.mark.parametrize("kind", sorted(PATTERNS))
@pytest.mark.parametrize("positional", ["rope", "alibi", "t5"])
def test_cuda_model_forward_and_gradients_equal_the_cpu_model(kind: str, positional: str) -> None:
    """A decoder with each sparse kind and bias: on CUDA (FlexAttention, compiled) the logits
    and every gradient equal the CPU model's (chunked kernel) in fp32."""
    options = {"window": 6} if kind in ("sliding_window", "lambda_shaped", "dilated") else {}
    cpu = build(attention__kind=kind, attention__options=options, positional__kind=positional).train()
    gpu = build(attention__kind=kind, attention__options=options, positional__kind=positional).train().cuda()
    tokens = torch.randint(0, 97, (2, 48))
    out_cpu, out_gpu = cpu(tokens), gpu(tokens.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-3)
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, a), (_, c) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(c.grad.cpu(), a.grad, atol=1e-4, rtol=1e-3, msg=name)


@needs_cuda
def test_cuda_bf16_autocast_and_compiled_training_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Training on CUDA in bf16 autocast, with the training step compiled, follows the fp32
    CPU run's losses closely (bf16 rounding only)."""
    from anyformer.config import apply_overrides
    from anyformer.training import Trainer

    from tests.training_helpers import tiny_config as run_config

    cfg = run_config(tmp_path, "--model.attention.kind=sliding_window", "--model.attention.options={window: 8}",
                     "--model.positional.kind=alibi")
    cpu = Trainer(cfg, run_dir=tmp_path / "cpu", verbose=False).fit()
    gpu = Trainer(apply_overrides(cfg, ["--train.device=cuda", "--train.dtype=bfloat16", "--train.compile=true"]),
                  run_dir=tmp_path / "gpu", verbose=False).fit()
    assert gpu.losses == pytest.approx(cpu.losses, abs=0.05)
