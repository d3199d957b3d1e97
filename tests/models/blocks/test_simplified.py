"""Shaped attention and the simplified (SAS-P) block (He & Hofmann 2023, "Simplifying
Transformer Blocks"): identity at initialisation, parameter savings, the formula written
naively, training, cached decoding, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import AttentionConfig, ConfigError
from anyformer.generation import generate
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.attention.context import AttentionContext
from anyformer.nn.build_context import BuildContext
from anyformer.nn.kv_cache import CacheSpec

V, D, L, H = 61, 32, 2, 4


def config(arch: str = "decoder", *, attention: dict | None = None, block: dict | None = None, **kw: object) -> ModelConfig:
    """A tiny model of simplified blocks with shaped attention (overridable)."""
    return ModelConfig(
        arch=arch, vocab_size=V, dim=D, num_layers=L, max_seq_len=64,
        attention={"kind": "shaped", "num_heads": H, **(attention or {})},
        block={"kind": "simplified", **(block or {})}, norm={"kind": "layernorm"}, **kw,
    )


def model_of(seed: int = 0, arch: str = "decoder", **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(arch, **kw)).eval()


def shaped_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "ShapedAttention"]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every shaped layer away from its identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in shaped_layers(model):
            layer.q_proj.weight.copy_(torch.randn(layer.q_proj.weight.shape, generator=g) * 0.5)
            for p in (layer.alpha, layer.beta, layer.gamma):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


# ---------------------------------------------------------------------------- 1. identity at init


@pytest.mark.parametrize("positional", ["rope", "learned"])
@pytest.mark.parametrize(
    "arch, keep",
    [
        ("decoder", None),
        ("decoder", [[1] * 9, [0, 0, 0] + [1] * 6]),  # left padding
        ("decoder", [[1] * 9, [1] * 5 + [0] * 4]),  # right padding
        ("encoder", None),
        ("encoder", [[1] * 9, [1] * 6 + [0] * 3]),
    ],
)
def test_attention_matrix_is_the_identity_at_initialisation(arch, keep, positional):
    model = model_of(arch=arch, positional={"kind": positional})
    tokens = torch.randint(0, V, (2, 9))
    store: list[torch.Tensor] = []
    with torch.no_grad():
        model(tokens, attention_mask=None if keep is None else torch.tensor(keep), attn_store=store)
    assert len(store) == L
    for weights in store:
        assert weights.shape == (2, H, 9, 9)
        torch.testing.assert_close(weights, torch.eye(9).expand(2, H, 9, 9), atol=0, rtol=0)


def test_block_at_initialisation_is_norm_plus_scaled_mlp():
    """SAS-P with no skip: y = 1 * shaped_attn(norm(x)) + 0.1 * mlp(norm(x)), and shaped
    attention with identity values/projection is norm(x) itself at initialisation."""
    model = model_of()
    block = model.stack.blocks[0]
    x = torch.randn(2, 7, D)
    ctx = AttentionContext(q_pos=torch.arange(7).expand(2, 7), k_pos=torch.arange(7).expand(2, 7), causal=True)
    with torch.no_grad():
        h = torch.nn.functional.layer_norm(x, (D,), eps=1e-5)  # unit weight, zero bias at init
        torch.testing.assert_close(block(x, ctx), h + 0.1 * block.ffn(h))


def test_with_a_skip_and_unit_gains_it_is_the_parallel_block():
    """Block 'simplified' with attention 'mha', skip_gain 1, fixed unit gains == block 'parallel'."""
    opts = {"skip_gain": 1.0, "attn_gain": 1.0, "ffn_gain": 1.0, "trainable_gains": False}
    ours = model_of(attention={"kind": "mha"}, block={"options": opts})
    torch.manual_seed(0)
    par = build_model(config(attention={"kind": "mha"}, block={"kind": "parallel"})).eval()
    par.load_state_dict({k.replace(".norm.", ".attn_norm."): v for k, v in ours.state_dict().items()})
    tokens = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), par(tokens))


# ---------------------------------------------------------------------------- 2. parameter count


@pytest.mark.parametrize("bias", [False, True])
def test_identity_values_and_projection_remove_exactly_their_weights(bias):
    full = model_of(attention={"bias": bias, "options": {"identity_values": False, "identity_projection": False}})
    simple = model_of(attention={"bias": bias})
    count = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    per_matrix = D * D + (D if bias else 0)  # a dim x dim weight (and its bias)
    assert count(full) - count(simple) == L * 2 * per_matrix
    values_only = model_of(attention={"bias": bias, "options": {"identity_values": False}})
    assert count(values_only) - count(simple) == L * per_matrix


# ---------------------------------------------------------------------------- 3. the formula, naively


def naive_shaped(x, wq, wk, alpha, beta, gamma, visible):
    """A (b, h, m, m) and out (b, m, D) of shaped attention with identity values/projection,
    by explicit loops; visible(bi, i, j) says whether query i may see key j."""
    x, wq, wk, alpha, beta, gamma = (t.detach() for t in (x, wq, wk, alpha, beta, gamma))
    b, m, dim = x.shape
    h = alpha.numel()
    d = dim // h
    q, k = x @ wq.T, x @ wk.T  # (b, m, D)
    A = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            for i in range(m):
                keys = [j for j in range(m) if visible(bi, i, j)]
                logits = [float(q[bi, i, sl] @ k[bi, j, sl]) / math.sqrt(d) for j in keys]
                top = max(logits, default=0.0)
                z = sum(math.exp(v - top) for v in logits)
                for j, v in zip(keys, logits):
                    A[bi, hi, i, j] += float(beta[hi]) * math.exp(v - top) / z - float(gamma[hi]) / len(keys)
                A[bi, hi, i, i] += float(alpha[hi])
    out = torch.zeros(b, m, dim, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            out[bi, :, sl] = A[bi, hi] @ x[bi, :, sl].double()
    return A, out


def shaped_layer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = AttentionConfig(kind="shaped", num_heads=H, kernel="eager")
    layer = ATTENTIONS.get("shaped")(cfg, BuildContext.standalone(cfg, dim=D)).eval()
    with torch.no_grad():
        layer.q_proj.weight.normal_(std=0.4)
        layer.k_proj.weight.normal_(std=0.4)
        for p in (layer.alpha, layer.beta, layer.gamma):
            p.copy_(torch.randn(H))
    return layer


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_shaped_attention_equals_the_formula_written_naively(causal, padded):
    layer = shaped_layer()
    b, m = 2, 7
    x = torch.randn(b, m, D)
    keep = torch.ones(b, m, dtype=torch.bool)
    if padded:
        keep[1, 5:] = False
    pos = torch.arange(m).expand(b, m)
    store: list[torch.Tensor] = []
    ctx = AttentionContext(q_pos=pos, k_pos=pos, mask=keep[:, None, None, :] if padded else None, causal=causal, store=store)
    with torch.no_grad():
        out = layer(x, ctx)
    A, ref = naive_shaped(x, layer.q_proj.weight, layer.k_proj.weight, layer.alpha, layer.beta, layer.gamma,
                          lambda bi, i, j: bool(keep[bi, j]) and (j <= i or not causal))
    torch.testing.assert_close(store[0].double(), A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_with_a_cache_the_new_queries_read_their_own_keys():
    """Two calls through a KV cache give the last rows of the full-sequence naive matrix:
    I[i, j] = 1 iff j == i + (m - n)."""
    layer = shaped_layer(seed=1)
    x = torch.randn(1, 7, D)
    cache = layer.make_cache(CacheSpec(batch=1, max_len=16))
    pos = torch.arange(7)[None]
    store: list[torch.Tensor] = []
    with torch.no_grad():
        layer(x[:, :5], AttentionContext(q_pos=pos[:, :5], k_pos=pos[:, :5], causal=True), cache=cache)
        out = layer(x[:, 5:], AttentionContext(q_pos=pos[:, 5:], k_pos=pos, causal=True, store=store), cache=cache)
    A, ref = naive_shaped(x, layer.q_proj.weight, layer.k_proj.weight, layer.alpha, layer.beta, layer.gamma, lambda bi, i, j: j <= i)
    torch.testing.assert_close(store[0].double(), A[:, :, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref[:, 5:], atol=1e-5, rtol=1e-5)


def test_centering_excludes_keys_an_additive_mask_forbids():
    layer = shaped_layer(seed=2)
    x = torch.randn(1, 6, D)
    bias = torch.zeros(1, H, 6, 6)
    bias[..., 2] = float("-inf")  # nobody sees key 2
    pos = torch.arange(6)[None]
    store: list[torch.Tensor] = []
    with torch.no_grad():
        layer(x, AttentionContext(q_pos=pos, k_pos=pos, bias=bias, store=store))
    A, _ = naive_shaped(x, layer.q_proj.weight, layer.k_proj.weight, layer.alpha, layer.beta, layer.gamma, lambda bi, i, j: j != 2)
    torch.testing.assert_close(store[0].double(), A, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- 4. training and decoding


def test_a_model_of_simplified_blocks_trains():
    model = model_of().train()
    tokens = torch.randint(0, V, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_zero_queries_leave_keys_without_gradient_only_at_initialisation():
    """W_Q = 0 makes the logits' gradient with respect to the keys zero at step 0 (the paper's
    initialisation); every other parameter learns at once, and the keys after one step."""
    model = model_of().train()
    tokens = torch.randint(0, V, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens).square().mean().backward()
    silent = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert silent == {f"stack.blocks.{i}.attn.k_proj.weight" for i in range(L)}
    opt.step()
    opt.zero_grad()
    model(tokens).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def greedy_by_recompute(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize(
    "attention",
    [{}, {"num_kv_heads": 2, "options": {"identity_values": False}}, {"options": {"identity_values": False, "identity_projection": False}}],
)
def test_cached_decoding_equals_full_recompute(attention):
    model = model_of(attention=attention)
    perturb(model)
    prompt = [7, 8, 9, 10, 11, 12]
    with torch.no_grad():  # the perturbed attention mixes tokens, so the cache matters
        a, b = model(torch.tensor([prompt])), model(torch.tensor([[1] + prompt[1:]]))
    assert not torch.allclose(a[0, -1], b[0, -1])
    assert generate(model, prompt, max_new_tokens=8)[0].tolist() == greedy_by_recompute(model, prompt, 8)


def test_batched_left_padded_decoding_equals_one_by_one():
    model = model_of()
    perturb(model, seed=3)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    batched = generate(model, prompts, max_new_tokens=5)
    for row, prompt in zip(batched, prompts):
        assert row[-5:].tolist() == generate(model, prompt, max_new_tokens=5)[0, -5:].tolist()


# ---------------------------------------------------------------------------- 5. config errors


@pytest.mark.parametrize(
    "kw, names",
    [
        ({"attention": {"num_kv_heads": 2}}, ["identity_values", "num_kv_heads"]),
        ({"attention": {"head_dim": 4}}, ["identity_values and identity_projection", "head_dim"]),
        ({"attention": {"head_dim": 4, "options": {"identity_values": False}}}, ["identity_projection=true", "head_dim"]),
        ({"attention": {"options": {"alpha": 1.0}}}, ["alpha", "shaped"]),
        ({"attention": {"options": {"beta_init": "one"}}}, ["beta_init"]),
        ({"block": {"options": {"skip": 1.0}}}, ["skip", "simplified"]),
        ({"norm": {"kind": "layernorm", "placement": "post"}}, ["placement"]),
    ],
)
def test_bad_options_raise_config_errors_naming_them(kw, names):
    norm = kw.pop("norm", None)
    cfg = config(**kw)
    if norm is not None:
        cfg.norm.placement = norm["placement"]
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    for name in names:
        assert name in str(err.value)


def test_encoder_decoder_needs_a_sequential_block():
    with pytest.raises(ConfigError, match="cross-attention"):
        build_model(config("encoder_decoder"))
    cross = AttentionConfig(kind="shaped", num_heads=H)
    with pytest.raises(ConfigError, match="self-attention only"):
        ATTENTIONS.get("shaped")(cross, BuildContext.standalone(cross, dim=D, cross=True))


def test_the_branch_gains_are_learned_by_default_as_in_the_paper() -> None:
    from anyformer.models.blocks.simplified import SimplifiedOptions

    assert SimplifiedOptions().trainable_gains is True
    from tests.helpers import build

    model = build(block__kind="simplified")
    names = {n for n, _ in model.named_parameters()}
    assert {"stack.blocks.0.attn_gain", "stack.blocks.0.ffn_gain"} <= names, sorted(names)[:8]


def test_the_block_built_by_hand_has_no_skip_and_the_options_branch_gains() -> None:
    """He & Hofmann's block has no skip connection (weight 0 on x). Built directly, without
    options, the block has no skip and the same branch gains as the registered options'
    defaults, so the two ways of making it agree."""
    import inspect

    from anyformer.models.blocks.simplified import SimplifiedBlock, SimplifiedOptions

    defaults = {k: p.default for k, p in inspect.signature(SimplifiedBlock.__init__).parameters.items()
                if k in ("skip_gain", "attn_gain", "ffn_gain")}
    opts = SimplifiedOptions()
    assert defaults["skip_gain"] == opts.skip_gain == 0.0
    assert (defaults["attn_gain"], defaults["ffn_gain"]) == (opts.attn_gain, opts.ffn_gain)
