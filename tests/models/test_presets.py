"""The named presets have the shapes of the models they are named for: each one's HF config (the
converter's `config_to_hf`) against transformers' own default config of that model (GPT-2
small, BERT base, T5 small and ViT base are those classes' defaults; ViT's read by the
converter's reader), and against the published
numbers for GPT-2 medium, SmolLM2-135M and the original Transformer's base model."""

from __future__ import annotations

import pytest
import transformers

from anyformer.convert import config_to_hf
from anyformer.models.presets import preset

FIELDS = {
    "gpt2-small": (transformers.GPT2Config, ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                                             "activation_function", "tie_word_embeddings"]),
    "bert-base": (transformers.BertConfig, ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                                            "layer_norm_eps", "pad_token_id"]),
    "t5-small": (transformers.T5Config, ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                         "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                                         "tie_word_embeddings"]),
}


@pytest.mark.parametrize("name", FIELDS)
def test_preset_equals_the_default_config_of_its_model_in_transformers(name: str) -> None:
    cls, fields = FIELDS[name]
    ours, theirs = config_to_hf(preset(name)), cls().to_dict()
    if name == "gpt2-small":  # GPT2Config leaves the MLP width as None, meaning 4 x n_embd
        assert ours["n_inner"] in (None, 4 * theirs["n_embd"])
    assert {f: ours[f] for f in fields} == {f: theirs[f] for f in fields}


def test_vit_base_equals_transformers_default_vit_config_read_by_the_converter() -> None:
    from anyformer.convert.vit import vit_config_from_hf
    from anyformer.nn.feedforward import hidden_size

    ours, theirs = preset("vit-base"), vit_config_from_hf(transformers.ViTConfig().to_dict())

    def shape(c):  # type: ignore[no-untyped-def]
        return (c.dim, c.num_layers, c.attention.num_heads, hidden_size(c.dim, c.ffn.hidden_mult, c.ffn.hidden_dim, c.ffn.multiple_of),
                c.ffn.activation, c.norm.eps, c.norm.placement, c.arch_options.image_size, c.arch_options.patch_size,
                c.arch_options.channels, c.max_seq_len)

    assert shape(ours) == shape(theirs) == (768, 12, 12, 3072, "gelu", 1e-12, "pre", 224, 16, 3, 197)


def test_gpt2_medium_smollm2_and_the_transformer_base_have_their_published_shapes() -> None:
    from anyformer.nn.feedforward import hidden_size

    base = preset("transformer-base")  # Vaswani et al. 2017, table 3: N 6, d_model 512, d_ff 2048, h 8, post-norm
    assert (base.num_layers, base.dim, base.attention.num_heads, base.norm.placement, base.positional.kind) == (6, 512, 8, "post", "sinusoidal")
    assert hidden_size(base.dim, base.ffn.hidden_mult, base.ffn.hidden_dim, base.ffn.multiple_of) == 2048
    medium = preset("gpt2-medium")
    assert (medium.num_layers, medium.dim, medium.attention.num_heads, medium.vocab_size, medium.max_seq_len) == (24, 1024, 16, 50257, 1024)
    hf = config_to_hf(preset("smollm2-135m"))
    hf["rope_theta"] = hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta"))
    assert {k: hf[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "rope_theta", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings")} == \
        {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
         "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True}
