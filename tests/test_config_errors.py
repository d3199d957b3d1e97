"""Configs round-trip through YAML, and bad input fails with a message that says what to fix."""

import pytest
import torch

from anyformer import ConfigError, ModelConfig, build_model, preset
from anyformer.config import apply_overrides, from_dict, load_yaml, save_yaml, to_dict
from anyformer.models.presets import PRESETS
from anyformer.models.summary import summarize

from .helpers import build, tiny_config


@pytest.mark.parametrize("name", PRESETS.names())
def test_presets_round_trip_through_yaml(name, tmp_path):
    cfg = preset(name)
    save_yaml(cfg, tmp_path / "m.yaml")
    assert load_yaml(ModelConfig, tmp_path / "m.yaml") == cfg


def test_dotted_overrides_are_typed_and_strict():
    cfg = apply_overrides(tiny_config(), ["--attention.num_heads=8", "--norm.eps=1e-6", "--positional.options.base=500000"])
    assert cfg.attention.num_heads == 8 and cfg.norm.eps == 1e-6 and cfg.positional.options == {"base": 500000}
    with pytest.raises(ConfigError, match=r"unknown config key 'attention.num_head'.*num_heads"):
        apply_overrides(cfg, ["--attention.num_head=8"])
    with pytest.raises(ConfigError, match=r"attention.num_heads: expected an integer"):
        apply_overrides(cfg, ["--attention.num_heads=many"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'dimm'; valid keys here: .*\bdim\b"):
        from_dict(ModelConfig, {"dimm": 3})
    with pytest.raises(ConfigError, match=r"unknown config key 'norm.kindd'"):
        from_dict(ModelConfig, {"norm": {"kindd": "rmsnorm"}})
    with pytest.raises(ConfigError, match=r"norm.placement: 'middle' is not one of 'pre', 'post', 'sandwich'"):
        from_dict(ModelConfig, {"norm": {"placement": "middle"}})


@pytest.mark.parametrize(
    "field,value,registry_name",
    [("positional__kind", "rotary", "rope"), ("attention__kernel", "flash9", "sdpa"), ("norm__kind", "batchnorm", "rmsnorm"),
     ("ffn__kind", "moe", "swiglu"), ("attention__kind", "magic", "mha")],
)
def test_unknown_registry_name_lists_valid_names(field, value, registry_name):
    with pytest.raises(ConfigError, match=rf"unknown .*'{value}'; valid names: .*{registry_name}"):
        build_model(tiny_config(**{field: value}))


def test_unknown_variant_option_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.positional.options \(rope\).bass'.*base"):
        build_model(tiny_config(positional__options={"bass": 1.0}))


def test_inconsistent_sizes():
    with pytest.raises(ConfigError, match=r"dim=30 is not divisible by model.attention.num_heads=4"):
        tiny_config(dim=30)
    with pytest.raises(ConfigError, match=r"num_heads=4 is not divisible by\s+model.attention.num_kv_heads=3"):
        tiny_config(attention__num_kv_heads=3)


def test_token_ids_outside_vocabulary():
    model = build()
    with pytest.raises(ValueError, match=r"contains id 97, outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match=r"contains id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"integer token ids"):
        model(torch.zeros(1, 3))


def test_sequence_longer_than_learned_positions():
    model = build(positional__kind="learned")
    with pytest.raises(ValueError, match=r"past max_seq_len=64 of the learned positional table"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_mask_shape_that_does_not_broadcast():
    model = build()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(5, 4\), which does not broadcast to .*\(2, 4, 5, 5\)"):
        model(tokens, attn_mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected"):
        model(tokens, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attn_mask must be bool .* or floating point"):
        model(tokens, attn_mask=torch.ones(5, 5, dtype=torch.long))


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt5'; valid names: .*gpt2-small"):
        preset("gpt5")


def test_summary_counts_match_module_parameters():
    cfg = preset("gpt2-small")
    s = summarize(cfg, batch=1, seq_len=1024)
    # GPT-2 small: 12 layers of (4 d^2 + 4 d) attention + (8 d^2 + 5 d) MLP + 2 x 2d norms, plus
    # token and position tables and the final norm; the head is tied
    d, v, ctx, layers = 768, 50257, 1024, 12
    per_layer = 4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d
    assert s.parameters == layers * per_layer + v * d + ctx * d + 2 * d
    assert s.embedding_parameters == v * d + ctx * d
    # forward FLOPs ~ 2 N + attention + head (Kaplan et al.)
    assert s.flops_per_token_forward == 2 * s.non_embedding_parameters + 2 * 2 * layers * 512 * d + 2 * d * v
    assert s.flops_per_token_training == 3 * s.flops_per_token_forward
    assert "parameters" in str(s) and to_dict(cfg)["dim"] == d


@pytest.mark.parametrize("threads", [0, -2])
def test_thread_counts_below_one_are_refused(threads):
    """train.threads=0 was torch's default (all cores) in disguise: it is refused, naming the setting."""
    from anyformer.config import ConfigError, apply_overrides
    from anyformer.training.config import default_run_config

    with pytest.raises(ConfigError, match=f"train.threads must be at least 1 .* got {threads}"):
        apply_overrides(default_run_config(), [f"--train.threads={threads}"]).validate()
    assert apply_overrides(default_run_config(), ["--train.threads=1"]).validate().train.threads == 1
