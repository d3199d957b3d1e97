"""New variants from outside the package: an attention kind, a block kind and a depth wiring
defined in a temporary module, registered there, built through the config, trained a few steps
and decoded with the cache, with no edit to the package; and an architecture with its own
options (`model.options`), checked by its own options dataclass."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.generation import generate

VARIANTS = textwrap.dedent('''
    """Variants written against the public extension points only."""
    import dataclasses

    import torch
    from torch import nn

    from anyformer.config import ConfigError
    from anyformer.models.common import Stack
    from anyformer.models.parts import Parts
    from anyformer.models.registry import ARCHITECTURES, BLOCKS, DEPTHS
    from anyformer.nn.attention import ATTENTIONS, MultiHeadAttention, mha_from_config
    from anyformer.nn.block import attention_cache


    class TemperedAttention(MultiHeadAttention):
        """Logits divided by a learned per-head temperature (a logit hook only)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.log_temperature = nn.Parameter(torch.zeros(self.num_heads, 1, 1))

        def modify_logits(self, logits, q, k, ctx):
            return logits * torch.exp(-self.log_temperature.float())


    @ATTENTIONS.register("ext_tempered")
    def build_tempered(cfg, ctx):
        return mha_from_config(cfg, ctx, cls=TemperedAttention)


    class ReZeroBlock(nn.Module):
        """x + a * attn(x), then + b * ffn(x), with learned scalar gates (no norms)."""

        def __init__(self, attn, ffn):
            super().__init__()
            self.attn, self.ffn = attn, ffn
            self.a = nn.Parameter(torch.tensor(0.5))
            self.b = nn.Parameter(torch.tensor(0.5))

        def make_cache(self, spec):
            return attention_cache(self.attn, spec)

        def forward(self, x, ctx, *, cache=None):
            x = x + self.a * self.attn(x, ctx, cache=cache)
            return x + self.b * self.ffn(x)


    @BLOCKS.register("ext_rezero")
    def build_rezero(parts, ctx):
        return ReZeroBlock(parts.attention(ctx), parts.feedforward(ctx))


    class LoopedStack(Stack):
        """The blocks applied `loops` times over (weights shared), one cache per application."""

        def __init__(self, blocks, final_norm, loops):
            super().__init__(blocks, final_norm)
            self.loops = loops

        def make_caches(self, spec):
            return [block.make_cache(spec) for _ in range(self.loops) for block in self.blocks]

        def forward(self, x, ctx, caches=None, **cross):
            i = 0
            for _ in range(self.loops):
                for block in self.blocks:
                    x = block(x, ctx, cache=None if caches is None else caches[i])
                    i += 1
            return self.final_norm(x)


    @DEPTHS.register("ext_looped")
    def build_looped(parts, ctx, blocks, final_norm):
        return LoopedStack(blocks, final_norm, int(parts.cfg.depth.options.get("loops", 2)))


    @dataclasses.dataclass
    class EmbedScaledOptions:
        """The architecture's own setting: a factor on the token embeddings."""

        factor: float = 2.0

        def validate(self, cfg):
            if self.factor <= 0:
                raise ConfigError(f"model.options.factor must be positive, got {self.factor}")


    @ARCHITECTURES.register("ext_embed_scaled", options=EmbedScaledOptions)
    def build_embed_scaled(cfg, parts):
        """The decoder with its embeddings scaled by options.factor."""
        plain = dataclasses.replace(cfg, arch="decoder", options={}, embed_scale=cfg.embed_scale * cfg.arch_options.factor)
        return ARCHITECTURES.get("decoder")(plain, Parts(plain))
''')


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ext")
    (folder / "my_anyformer_variants.py").write_text(VARIANTS)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("my_anyformer_variants")
    finally:
        sys.path.remove(str(folder))


def config(**sections: object) -> ModelConfig:
    base: dict = dict(vocab_size=50, dim=32, num_layers=2, max_seq_len=48, attention={"num_heads": 4, "num_kv_heads": 2})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return ModelConfig(**base)


CASES = {
    "attention": {"attention": {"kind": "ext_tempered"}},
    "block": {"block": {"kind": "ext_rezero"}},
    "depth": {"depth": {"kind": "ext_looped", "options": {"loops": 2}}},
}


def full_recompute_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that reruns the whole sequence every step (no cache)."""
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens


@pytest.mark.parametrize("case", CASES)
def test_external_variant_builds_trains_and_decodes(variants, case: str) -> None:
    torch.manual_seed(0)
    model = build_model(config(**CASES[case]))
    if case == "attention":
        assert any(type(m).__name__ == "TemperedAttention" for m in model.modules())
    if case == "block":
        assert type(model.stack.blocks[0]).__name__ == "ReZeroBlock"
    if case == "depth":
        assert type(model.stack).__name__ == "LoopedStack"
    # a few training steps on a fixed batch lower the loss, and the variant's own parameters move
    tokens = torch.randint(0, 50, (4, 24))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every parameter, the variant's included, gets a gradient
    # cached decoding equals a full recompute, with and without the fast decoding path
    model.eval()
    prompt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        ref = full_recompute_greedy(model, prompt, 12)
    for compile in (False, True):
        assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=compile), ref)
    # batched, left-padded prompts decode as each prompt alone
    rows = [[1, 2, 3, 4, 5, 6], [7, 8]]
    batch = generate(model, rows, max_new_tokens=6, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = generate(model, row, max_new_tokens=6)
        assert batch[i, -6:].tolist() == alone[0, -6:].tolist()


def test_unknown_variant_names_list_the_registered_ones(variants) -> None:
    from anyformer.config import ConfigError

    with pytest.raises(ConfigError, match="unknown block kind 'nope'.*ext_rezero.*parallel.*sequential"):
        build_model(config(block={"kind": "nope"}))
    with pytest.raises(ConfigError, match="unknown depth wiring 'nope'.*ext_looped.*plain"):
        build_model(config(depth={"kind": "nope"}))
    with pytest.raises(ConfigError, match="unknown architecture 'nope'.*decoder.*encoder.*vit"):
        build_model(config(arch="nope"))


def test_external_architecture_owns_its_options(variants) -> None:
    from anyformer.config import ConfigError, from_dict, to_dict

    cfg = config(arch="ext_embed_scaled", options={"factor": 3.0})
    assert cfg.arch_options.factor == 3.0 and from_dict(ModelConfig, to_dict(cfg)) == cfg
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    torch.manual_seed(0)
    reference = build_model(config(embed_scale=3.0)).eval()  # the same model written with the shared field
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert torch.equal(ours(tokens), reference(tokens))
    assert config(arch="ext_embed_scaled").arch_options.factor == 2.0  # the option's default
    with pytest.raises(ConfigError, match="model.options.factor must be positive, got -1.0"):
        build_model(config(arch="ext_embed_scaled", options={"factor": -1.0}))
    with pytest.raises(ConfigError, match=r"unknown config key 'model.options \(ext_embed_scaled\).fator'; valid keys here: factor"):
        config(arch="ext_embed_scaled", options={"fator": 1.0}).validate()
