"""HyperAttention: exact below the threshold, exact when one block holds every key, close to
softmax attention when LSH can find each query's large entries, causal, differentiable."""

import pytest
import torch
import torch.nn.functional as F

from anyformer.config import ConfigError
from anyformer.models.builders import build_model
from anyformer.nn.attention.hyper import AngularLSH, HyperAttentionKernel, causal_hyper_attention, hyper_attention
from anyformer.nn.attention.kernels import eager_attention

from tests.helpers import build, tiny_config


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def test_equals_mha_exactly_below_the_threshold():
    tokens = torch.randint(0, 97, (2, 12))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 9:] = False
    mha = build("decoder", attention__kind="mha")
    hyper = build("decoder", attention__kind="hyper", attention__options={"min_seq_len": 12})
    hyper.load_state_dict(mha.state_dict(), strict=False)  # the LSH projections are hyper's own
    with torch.no_grad():
        assert torch.equal(hyper(tokens, attention_mask=keep), mha(tokens, attention_mask=keep))
        c1, c2 = mha.make_cache(2, 16), hyper.make_cache(2, 16)
        assert torch.equal(hyper(tokens[:, :7], c2), mha(tokens[:, :7], c1))
        assert torch.equal(hyper(tokens[:, 7:8], c2), mha(tokens[:, 7:8], c1))


@pytest.mark.parametrize("causal", [False, True])
def test_one_block_holding_every_key_is_exact(causal):
    # with block_size >= m the sorted block-diagonal part covers every (query, key) pair and
    # every sampled column is masked, so the merge must reproduce softmax exactly
    q, k, v = torch.randn(3, 2, 2, 64, 16).unbind(0)
    keep = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    keep[0, ..., 50:] = False
    kernel = HyperAttentionKernel(16, exact=eager_attention, min_seq_len=8, block_size=64, sample_size=16, num_bits=5)
    torch.testing.assert_close(kernel(q, k, v, causal=causal), eager_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        kernel(q, k, v, mask=keep, causal=causal), eager_attention(q, k, v, mask=keep, causal=causal), atol=1e-5, rtol=1e-5
    )


def test_causal_recursion_with_cached_prefix_is_exact_with_one_block():
    q = torch.randn(1, 2, 40, 8)
    k, v = torch.randn(2, 1, 2, 64, 8).unbind(0)  # 24 earlier keys, then the 40 queries' own
    kernel = HyperAttentionKernel(8, exact=eager_attention, min_seq_len=4, block_size=64, sample_size=8, num_bits=4)
    torch.testing.assert_close(kernel(q, k, v, causal=True), eager_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def near_duplicate_problem(noise, n=512, d=32, norm=4.5):
    """Keys with random directions, each query a noisy copy of its key: every row of the
    attention matrix is dominated by one entry, exactly the entries angular LSH collides."""
    u = F.normalize(torch.randn(1, 2, n, d), dim=-1)
    q = F.normalize(u + noise * torch.randn_like(u) / d**0.5, dim=-1) * norm
    return q, u * norm, torch.randn(1, 2, n, d)


def test_finds_dominant_entries_that_sampling_alone_would_miss():
    lsh = AngularLSH(32, 7)
    part = dict(scale=1.0, lsh=lsh, block_size=64, sample_size=64)
    q, k, v = near_duplicate_problem(0.0)
    exact = eager_attention(q, k, v, scale=1.0)
    out, _ = hyper_attention(q, k, v, **part)
    assert rel_error(out, exact) < 0.02
    # a query that misses its key's bucket falls back on samples; most queries must not
    q, k, v = near_duplicate_problem(0.1)
    exact = eager_attention(q, k, v, scale=1.0)
    baseline = rel_error(v.mean(2, keepdim=True).expand_as(exact), exact)  # ~1: sampling-only's limit
    assert rel_error(hyper_attention(q, k, v, **part)[0], exact) < 0.6 * baseline
    causal, _ = causal_hyper_attention(q, k, v, **part, min_seq_len=64)
    assert rel_error(causal, eager_attention(q, k, v, scale=1.0, causal=True)) < 0.05


def test_uniform_attention_normaliser_is_estimated():
    # q = 0 makes every logit 0: the exact log-sum-exp is log(m); the blocks give log(K) and the
    # scaled samples estimate the remaining m - K keys
    q, k, v = torch.zeros(1, 4, 256, 16), torch.randn(1, 4, 256, 16), torch.randn(1, 4, 256, 16)
    _, lse = hyper_attention(q, k, v, scale=1.0, lsh=AngularLSH(16, 6), block_size=32, sample_size=128)
    torch.testing.assert_close(lse.mean(), torch.tensor(256.0).log(), atol=0.05, rtol=0)


def test_gradients_flow_above_the_threshold():
    q, k, v = (torch.randn(1, 2, 96, 8, requires_grad=True) for _ in range(3))
    kernel = HyperAttentionKernel(8, exact=eager_attention, min_seq_len=16, block_size=16, sample_size=16, num_bits=4)
    kernel(q, k, v, causal=True).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 and t.grad.isfinite().all() for t in (q, k, v))


def test_causal_outputs_never_weight_future_keys():
    # the weights of query i cover keys j <= i only: changing later values (keys and queries
    # fixed, so the LSH sort and the samples stay the same) leaves earlier outputs unchanged
    q, k, v = torch.randn(3, 1, 2, 96, 8).unbind(0)
    v2 = v.clone()
    v2[:, :, 70:] = torch.randn(1, 2, 26, 8)
    kernel = HyperAttentionKernel(8, exact=eager_attention, min_seq_len=8, block_size=8, sample_size=8, num_bits=4)
    torch.manual_seed(1)
    a = kernel(q, k, v, causal=True)
    torch.manual_seed(1)
    b = kernel(q, k, v2, causal=True)
    torch.testing.assert_close(a[:, :, :70], b[:, :, :70], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, 70:], b[:, :, 70:])


def test_bias_above_threshold_raises_and_bad_options_raise():
    model = build("decoder", attention__kind="hyper", positional__kind="alibi", attention__options={"min_seq_len": 4})
    with pytest.raises(ValueError, match="key-padding"):
        model(torch.randint(0, 97, (1, 9)))
    with pytest.raises(ConfigError, match="block_size"):
        build_model(tiny_config("decoder", attention__kind="hyper", attention__options={"block_size": 0}))


def test_gradients_stay_finite_when_some_rows_have_no_sampled_key():
    """Causal recursion with small blocks and few samples leaves some (query, part) pairs with
    no key at all; their log-sum-exp is -inf and must not turn gradients into NaN."""
    from anyformer.config import ModelConfig, from_dict
    from anyformer.models import build_model

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, dict(
        arch="decoder", vocab_size=64, dim=64, num_layers=2, max_seq_len=48,
        attention=dict(kind="hyper", num_heads=4, options={"min_seq_len": 16, "block_size": 8, "sample_size": 8}),
        positional=dict(kind="rope"), ffn=dict(kind="swiglu", hidden_mult=2.0),
    )).validate()
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (64, 48))
    out = model(tokens)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def mean_row_error(out, exact):
    return float(((out - exact).norm(dim=-1) / exact.norm(dim=-1)).mean())


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_exact_attention_falls_as_blocks_and_samples_grow(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 512, 16).unbind(0)
    q, k = q * 1.5, k * 1.5  # peaked rows: the sampled estimate matters
    exact = eager_attention(q, k, v, causal=causal)
    errors = []
    for size in (8, 32, 128, 512):
        runs = []
        for seed in range(3):
            torch.manual_seed(seed)
            kernel = HyperAttentionKernel(16, exact=eager_attention, min_seq_len=32, block_size=size, sample_size=size, num_bits=5)
            runs.append(mean_row_error(kernel(q, k, v, causal=causal), exact))
        errors.append(sum(runs) / len(runs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    if causal:  # one block of 512 covers each off-diagonal part: exact
        assert errors[-1] < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_inference_path_equals_the_differentiable_path(causal):
    """Without gradients the fused kernel runs; with them, the explicit fp32 form. With the same
    samples both give the same function, also where left padding leaves rows with no visible key."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 300, 16)
    k, v = torch.randn(2, 2, 2, 300, 16).unbind(0)  # grouped keys: 2 query heads per key head
    keep = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    keep[1, ..., :90] = False
    kernel = HyperAttentionKernel(16, exact=eager_attention, min_seq_len=40, block_size=32, sample_size=24, num_bits=4)
    torch.manual_seed(5)
    fast = kernel(q, k, v, mask=keep, causal=causal)
    torch.manual_seed(5)
    slow = kernel(q.requires_grad_(), k, v, mask=keep, causal=causal)
    torch.testing.assert_close(fast, slow.detach(), atol=2e-5, rtol=2e-5)
    assert fast.isfinite().all()


def test_bfloat16_inputs_follow_float32():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 256, 32).unbind(0)
    kernel = HyperAttentionKernel(32, exact=eager_attention, min_seq_len=32, block_size=32, sample_size=32, num_bits=5)
    torch.manual_seed(1)
    ref = kernel(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), causal=True)  # same LSH buckets
    torch.manual_seed(1)
    half = kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert half.dtype == torch.bfloat16
    assert rel_error(half.float(), ref) < 0.03


def test_the_default_lsh_block_and_sample_sizes_are_the_authors():
    """By default 7 hyperplanes (128 buckets), blocks of 256 keys and 256 sampled columns: the
    defaults of the authors' HyperAttention module (Han et al. 2024). The exact threshold is
    this package's own (1024 keys, where the approximation starts to pay on CPU)."""
    model = build_model(tiny_config(attention=dict(kind="hyper", num_heads=4)))
    kernels = [m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), HyperAttentionKernel)]
    assert len(kernels) == 2
    kernel = kernels[0]
    assert (kernel.lsh.num_buckets, kernel.block_size, kernel.sample_size, kernel.min_seq_len) == (128, 256, 256, 1024)


def test_the_smallest_settings_are_allowed():
    """Blocks of one key, exact attention only at one key, one hyperplane, no samples (and the
    most hyperplanes, 20): the bounds are inclusive, and such a layer runs above its threshold."""
    for options in ({"block_size": 1, "min_seq_len": 1, "num_bits": 1, "sample_size": 0}, {"num_bits": 20, "min_seq_len": 4}):
        model = build_model(tiny_config(attention=dict(kind="hyper", num_heads=4, options=options))).eval()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 97, (1, 12)))).all()
