"""Model-level properties, parametrized over every registry entry."""

import pytest
import torch

from anyformer.models.builders import count_parameters
from anyformer.nn.attention import ATTENTIONS, KERNELS
from anyformer.nn.block import PLACEMENTS
from anyformer.nn.feedforward import FEEDFORWARDS
from anyformer.nn.norm import NORMS
from anyformer.nn.positional import POSITIONALS

from tests.helpers import build, run_model, skip_if_needs_graph

ARCHS = ["decoder", "encoder", "encoder_decoder"]


def expected_shape(model, b, n):
    cfg = model.config
    return (b, n, cfg.dim) if cfg.arch == "encoder" else (b, n, cfg.vocab_size)


def assert_all_params_get_grads(model, tokens):
    """Every parameter gets a gradient, checked at a generic point: parameters a variant
    initialises to exactly zero (e.g. shaped attention's queries, which make the keys' first
    gradient zero by design) are perturbed first."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum() > 0:
                p.normal_(std=0.02)
    run_model(model, tokens).float().square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positional", POSITIONALS.names())
def test_positional_shapes_and_gradients(arch, positional):
    skip_if_needs_graph(positional)
    model = build(arch, positional__kind=positional)
    tokens = torch.randint(0, 97, (2, 9))
    assert run_model(model, tokens).shape == expected_shape(model, 2, 9)
    assert_all_params_get_grads(model, tokens)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS.names())
@pytest.mark.parametrize("placement", PLACEMENTS.names())
def test_norms_and_placements(arch, norm, placement):
    model = build(arch, norm__kind=norm, norm__placement=placement, final_norm=placement != "post")
    tokens = torch.randint(0, 97, (2, 6))
    assert run_model(model, tokens).shape == expected_shape(model, 2, 6)
    assert_all_params_get_grads(model, tokens)


@pytest.mark.parametrize("ffn", FEEDFORWARDS.names())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_feedforwards(ffn, activation):
    try:
        model = build("decoder", ffn__kind=ffn, ffn__activation=activation, ffn__bias=True, ffn__hidden_mult=2.5)
    except ValueError as e:  # a kind of fixed form (RWKV's channel mixing) refuses, naming the settings to leave unset
        if "leave model.ffn" not in str(e):
            raise
        pytest.skip(str(e))
    tokens = torch.randint(0, 97, (2, 6))
    assert run_model(model, tokens).shape == (2, 6, 97)
    assert_all_params_get_grads(model, tokens)


def skip_if_causal_only(kind, arch):
    """Skip kinds whose factory declares `causal_only` for architectures with a non-causal stack
    (an encoder, or an encoder-decoder's encoder): they refuse to build there."""
    if arch != "decoder" and getattr(ATTENTIONS.get(kind), "causal_only", False):
        pytest.skip(f"attention kind '{kind}' is causal-only; arch '{arch}' has a non-causal stack")


@pytest.mark.parametrize("kind", ATTENTIONS.names())
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kinds_shapes_and_gradients(kind, arch):
    skip_if_causal_only(kind, arch)
    model = build(arch, attention__kind=kind)
    tokens = torch.randint(0, 97, (2, 8))
    assert run_model(model, tokens).shape == expected_shape(model, 2, 8)
    assert_all_params_get_grads(model, tokens)


@pytest.mark.parametrize("kind", ATTENTIONS.names())
@pytest.mark.parametrize("positional", POSITIONALS.names())
def test_causal_model_ignores_future_tokens(kind, positional):
    skip_if_needs_graph(positional)
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[:, 7:] = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        try:
            model = build("decoder", attention__kind=kind, positional__kind=positional)
            la, lb = model(a), model(b)
        except ValueError as e:  # a relative encoding's terms that the kind cannot take: refused, naming the encoding
            if "positional kind" not in str(e):
                raise
            pytest.skip(str(e))
    torch.testing.assert_close(la[:, :7], lb[:, :7], atol=1e-5, rtol=0)
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


def test_encoder_decoder_target_causality():
    model = build("encoder_decoder", positional__kind="sinusoidal")
    src = torch.randint(0, 97, (1, 10))
    tgt = torch.randint(0, 97, (1, 8))
    tgt2 = tgt.clone()
    tgt2[:, 5:] = (tgt2[:, 5:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt)[:, :5], model(src, tgt2)[:, :5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ATTENTIONS.names())
def test_encoder_without_positions_is_permutation_equivariant(kind):
    if getattr(ATTENTIONS.get(kind), "position_dependent", False):
        pytest.skip(f"attention kind '{kind}' uses a sparsity pattern over token indices")
    skip_if_causal_only(kind, "encoder")
    model = build("encoder", attention__kind=kind, positional__kind="none")
    tokens = torch.randint(0, 97, (2, 10))
    perm = torch.randperm(10)
    with torch.no_grad():
        out, out_perm = model(tokens), model(tokens[:, perm])
    torch.testing.assert_close(out[:, perm], out_perm, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positional", POSITIONALS.names())
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_eager_equals_sdpa_in_models(arch, positional, kv_heads):
    skip_if_needs_graph(positional)
    tokens = torch.randint(0, 97, (2, 9))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    outs = []
    for kernel in KERNELS.names():
        model = build(arch, seed=3, attention__kernel=kernel, attention__num_kv_heads=kv_heads, positional__kind=positional)
        with torch.no_grad():
            if arch == "encoder_decoder":
                outs.append(model(tokens, tokens, keep, keep))
            else:
                outs.append(model(tokens, attention_mask=keep))
    for other in outs[1:]:
        torch.testing.assert_close(outs[0], other, atol=1e-5, rtol=0)


def test_arbitrary_graph_mask_and_attention_weights():
    model = build("encoder", positional__kind="none", attention__kernel="sdpa")
    tokens = torch.randint(0, 97, (1, 6))
    # a path graph: each token attends to itself and its neighbours only
    idx = torch.arange(6)
    adjacency = (idx[:, None] - idx[None, :]).abs() <= 1
    store: list = []
    with torch.no_grad():
        out = model(tokens, attn_mask=adjacency, attn_store=store)
        ref = build("encoder", positional__kind="none", attention__kernel="eager")(tokens, attn_mask=adjacency)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert len(store) == 2 and store[0].shape == (1, 4, 6, 6)
    assert (store[0][..., ~adjacency] == 0).all()
    torch.testing.assert_close(store[0].sum(-1), torch.ones(1, 4, 6))
    # changing a token outside a node's 2-hop neighbourhood cannot change that node's output
    far = tokens.clone()
    far[0, 5] = (far[0, 5] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(far, attn_mask=adjacency)[0, :3], out[0, :3], atol=1e-6, rtol=0)


def test_padding_does_not_change_real_tokens():
    model = build("encoder", positional__kind="learned")
    tokens = torch.randint(1, 97, (1, 5))
    padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], 1)
    keep = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, keep)[:, :5], model(tokens), atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_tensor():
    tied = build("decoder", tie_embeddings=True)
    untied = build("decoder", tie_embeddings=False)
    assert tied.lm_head.proj.weight is tied.embed.tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 97 * 32


def test_gqa_reduces_kv_projection_size():
    mha, mqa = build("decoder"), build("decoder", attention__num_kv_heads=1)
    blk = mqa.stack.blocks[0].attn.sublayer
    assert blk.k_proj.weight.shape == (8, 32) and mha.stack.blocks[0].attn.sublayer.k_proj.weight.shape == (32, 32)
