"""Depth wirings (DenseFormer averaging, looped depth) and the learnable sinusoidal encoding."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.config import ConfigError
from anyformer.generation import generate
from anyformer.models.builders import count_parameters


def config(layers: int = 5, **sections: object) -> ModelConfig:
    return ModelConfig(vocab_size=50, dim=32, num_layers=layers, max_seq_len=48, attention={"num_heads": 4, "num_kv_heads": 2},
                       **sections)  # type: ignore[arg-type]


def full_recompute_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


def train_steps(model, steps: int = 12) -> list[float]:
    tokens = torch.randint(0, 50, (4, 20), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- DenseFormer

DWA = [(1, 1), (2, 1), (1, 2), (2, 3), (4, 1)]


@pytest.mark.parametrize("dilation,period", DWA)
def test_untrained_denseformer_equals_the_plain_model_exactly(dilation: int, period: int) -> None:
    torch.manual_seed(0)
    plain = build_model(config()).eval()
    dense = build_model(config(depth={"kind": "denseformer", "options": {"dilation": dilation, "period": period}})).eval()
    missing, unexpected = dense.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("stack.weights.") for name in missing)
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        assert torch.equal(dense(tokens), plain(tokens))


@pytest.mark.parametrize("dilation,period", DWA)
def test_number_of_averaging_weights_follows_the_paper(dilation: int, period: int) -> None:
    layers = 5
    dense = build_model(config(layers, depth={"kind": "denseformer", "options": {"dilation": dilation, "period": period}}))
    # the authors' count: block i (0-based) is followed by an average when (i + 1) % period == 0,
    # over (i + 1 + dilation) // dilation outputs
    expected = sum((i + 1 + dilation) // dilation for i in range(layers) if (i + 1) % period == 0)
    assert sum(p.numel() for p in dense.stack.weights) == expected
    assert count_parameters(dense) == count_parameters(build_model(config(layers))) + expected


def test_denseformer_average_is_the_weighted_sum_of_earlier_outputs() -> None:
    """With non-identity weights, the input of each block is the weighted sum of the embeddings
    and the outputs of the blocks with the same residue mod the dilation (checked with hooks)."""
    torch.manual_seed(1)
    dense = build_model(config(4, depth={"kind": "denseformer", "options": {"dilation": 2, "period": 1}})).eval()
    with torch.no_grad():
        for w in dense.stack.weights:
            w.copy_(torch.randn_like(w))
    inputs, outputs = [], []

    def record(module, args, out) -> None:
        inputs.append(args[0])
        outputs.append(out)

    for block in dense.stack.blocks:
        block.register_forward_hook(record)
    tokens = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        dense(tokens)
    xs = [inputs[0]] + outputs  # X_0 (embeddings, the first block's input), X_1..X_4
    for t in range(1, 4):  # the input of block t + 1 is Y_t
        same = [xs[s] for s in range(t + 1) if (t - s) % 2 == 0]
        w = dense.stack.weights[t - 1]
        expected = sum(wi * x for wi, x in zip(w, same))
        torch.testing.assert_close(inputs[t], expected, atol=1e-5, rtol=1e-5)


def test_trained_denseformer_decodes_with_the_cache() -> None:
    torch.manual_seed(2)
    dense = build_model(config(4, depth={"kind": "denseformer", "options": {"dilation": 2, "period": 1}}))
    losses = train_steps(dense)
    assert losses[-1] < losses[0] - 0.1
    assert any(not torch.equal(w[:-1], torch.zeros_like(w[:-1])) for w in dense.stack.weights)  # the averages learned
    dense.eval()
    prompt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        ref = full_recompute_greedy(dense, prompt, 10)
    for compile in (False, True):
        assert torch.equal(generate(dense, prompt, max_new_tokens=10, compile=compile), ref)


@pytest.mark.parametrize("name,value", [("dilation", 0), ("period", -1)])
def test_denseformer_bad_options_are_named(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"model.depth.options.{name}"):
        build_model(config(depth={"kind": "denseformer", "options": {name: value}}))


# --------------------------------------------------------------------------- looped depth


def unrolled_copy(looped, loops: int) -> torch.nn.Module:
    """A plain model with loops * L blocks, each a copy of the looped model's shared block."""
    cfg = looped.config
    plain = build_model(config(cfg.num_layers * loops)).eval()
    sd = {k: v for k, v in looped.state_dict().items() if not k.startswith("stack.blocks.")}
    L = cfg.num_layers
    for k, v in looped.state_dict().items():
        if k.startswith("stack.blocks."):
            _, _, j, rest = k.split(".", 3)
            for t in range(loops):
                sd[f"stack.blocks.{t * L + int(j)}.{rest}"] = v
    plain.load_state_dict(sd, strict=True)
    return plain


def test_looped_depth_has_one_groups_parameters() -> None:
    looped = build_model(config(2, depth={"kind": "looped", "options": {"loops": 4}}))
    assert count_parameters(looped) == count_parameters(build_model(config(2)))
    with_steps = build_model(config(2, depth={"kind": "looped", "options": {"loops": 4, "eval_loops": 6, "step_embedding": True}}))
    assert count_parameters(with_steps) == count_parameters(looped) + 6 * 32


def test_t_loops_equal_t_explicit_copies_and_eval_loops_apply_in_eval() -> None:
    torch.manual_seed(3)
    looped = build_model(config(2, depth={"kind": "looped", "options": {"loops": 2, "eval_loops": 3}}))
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        looped.train()  # no dropout in this config: training mode only changes the loop count
        torch.testing.assert_close(looped(tokens), unrolled_copy(looped, 2)(tokens), atol=0, rtol=0)
        looped.eval()
        torch.testing.assert_close(looped(tokens), unrolled_copy(looped, 3)(tokens), atol=0, rtol=0)


def test_input_injection_and_step_embeddings_follow_the_formula() -> None:
    torch.manual_seed(4)
    looped = build_model(config(2, depth={"kind": "looped", "options": {"loops": 3, "input_injection": True, "step_embedding": True}})).eval()
    with torch.no_grad():
        looped.stack.step_embed.normal_()
    from anyformer.models.common import self_attention_context

    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        ctx = self_attention_context(tokens, looped.positional, causal=True, num_heads=4)
        x0 = looped.embed(tokens, ctx.q_pos, looped.positional)
        x = x0
        for t in range(3):
            x = x + looped.stack.step_embed[t] + (x0 if t > 0 else 0)
            for block in looped.stack.blocks:
                x = block(x, ctx)
        expected = looped.lm_head(looped.stack.final_norm(x))
        torch.testing.assert_close(looped(tokens), expected, atol=1e-6, rtol=1e-6)


def test_looped_model_trains_and_decodes_with_the_cache() -> None:
    torch.manual_seed(5)
    looped = build_model(config(2, depth={"kind": "looped", "options": {"loops": 2, "eval_loops": 3, "input_injection": True}}))
    losses = train_steps(looped)
    assert losses[-1] < losses[0] - 0.1
    looped.eval()
    prompt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        ref = full_recompute_greedy(looped, prompt, 10)
    for compile in (False, True):
        assert torch.equal(generate(looped, prompt, max_new_tokens=10, compile=compile), ref)


@pytest.mark.parametrize("options,name", [({"loops": -1}, "loops"), ({"loops": 0}, "loops"), ({"eval_loops": 0}, "eval_loops")])
def test_looped_bad_options_are_named(options: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=f"model.depth.options.{name}"):
        build_model(config(depth={"kind": "looped", "options": options}))


# --------------------------------------------------------------------------- learnable sinusoidal


def test_learnable_sinusoidal_is_a_feed_forward_of_the_sinusoids() -> None:
    torch.manual_seed(6)
    model = build_model(config(2, positional={"kind": "learnable_sinusoidal", "options": {"hidden": 16}})).eval()
    pe = model.positional
    positions = torch.tensor([[0, 1, 5, 17]])
    d = 32
    table = torch.tensor([[[math.sin(p / 10000 ** (2 * (c // 2) / d)) if c % 2 == 0 else math.cos(p / 10000 ** (2 * (c // 2) / d))
                            for c in range(d)] for p in row] for row in positions.tolist()])
    w1, b1, w2, b2 = pe.ffn[0].weight, pe.ffn[0].bias, pe.ffn[2].weight, pe.ffn[2].bias
    expected = torch.nn.functional.gelu(table @ w1.T + b1) @ w2.T + b2
    with torch.no_grad():
        torch.testing.assert_close(pe.encoding(positions), expected, atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 4, d)
        torch.testing.assert_close(pe.embed(x, positions), x + expected, atol=1e-5, rtol=1e-5)


def test_learnable_sinusoidal_trains_and_refuses_a_rolling_cache() -> None:
    torch.manual_seed(7)
    model = build_model(config(2, positional={"kind": "learnable_sinusoidal"}))
    before = model.positional.ffn[0].weight.detach().clone()
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.1 and not torch.equal(before, model.positional.ffn[0].weight)
    with pytest.raises(ValueError, match="relative positional encoding"):
        generate(model.eval(), [1, 2, 3], max_new_tokens=5, window=8)
    with pytest.raises(ConfigError, match="model.positional.options.hidden"):
        build_model(config(2, positional={"kind": "learnable_sinusoidal", "options": {"hidden": -2}}))
