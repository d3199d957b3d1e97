"""Named model sizes: the well-known shapes and tiny versions of each for tests."""

from __future__ import annotations

from typing import Any, Callable

from ..config import ConfigError, ModelConfig, from_dict, merge_sections, to_dict
from ..registry import Registry

PRESETS: Registry[Callable[[], dict[str, Any]]] = Registry("model preset")


def _gpt2(layers: int, dim: int, heads: int, vocab: int = 50257, ctx: int = 1024) -> dict[str, Any]:
    return dict(
        arch="decoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, bias=True),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=1e-5, placement="pre"),
        ffn=dict(kind="mlp", activation="gelu_tanh", bias=True, hidden_mult=4.0),
        tie_embeddings=True,
    )


def _llama(layers: int, dim: int, heads: int, kv_heads: int, hidden: int, vocab: int, ctx: int, base: float = 10000.0) -> dict[str, Any]:
    return dict(
        arch="decoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, num_kv_heads=kv_heads),
        positional=dict(kind="rope", options=dict(base=base)),
        norm=dict(kind="rmsnorm", eps=1e-5, placement="pre"),
        ffn=dict(kind="swiglu", hidden_dim=hidden),
        tie_embeddings=False,
    )


def _bert(layers: int, dim: int, heads: int, vocab: int = 30522, ctx: int = 512) -> dict[str, Any]:
    return dict(
        arch="encoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, bias=True),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=1e-12, placement="post"),
        ffn=dict(kind="mlp", activation="gelu", bias=True, hidden_mult=4.0),
        final_norm=False, embed_norm=True, num_token_types=2, pad_token_id=0,
    )


def _t5(layers: int, dim: int, heads: int, ffn: int, vocab: int = 32128, ctx: int = 512) -> dict[str, Any]:
    return dict(
        arch="encoder_decoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, head_dim=dim // heads, scale=1.0),
        positional=dict(kind="t5", options=dict(num_buckets=32, max_distance=128)),
        norm=dict(kind="rmsnorm", eps=1e-6, placement="pre"),
        ffn=dict(kind="mlp", activation="relu", bias=False, hidden_dim=ffn),
        tie_embeddings=True, share_embeddings=True, logit_scale=dim**-0.5, pad_token_id=0,
    )


def _transformer(layers: int, dim: int, heads: int, vocab: int, ctx: int) -> dict[str, Any]:
    return dict(
        arch="encoder_decoder", vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=ctx,
        attention=dict(num_heads=heads, bias=True),
        positional=dict(kind="sinusoidal"),
        norm=dict(kind="layernorm", eps=1e-5, placement="post"),
        ffn=dict(kind="mlp", activation="relu", bias=True, hidden_mult=4.0),
        final_norm=False, embed_scale=dim**0.5, tie_embeddings=True, share_embeddings=True,
    )


def _vit(layers: int, dim: int, heads: int, image: int, patch: int, channels: int = 3, labels: int = 1000) -> dict[str, Any]:
    return dict(
        arch="vit", vocab_size=1, dim=dim, num_layers=layers, max_seq_len=(image // patch) ** 2 + 1,
        attention=dict(num_heads=heads, bias=True),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=1e-12, placement="pre"),
        ffn=dict(kind="mlp", activation="gelu", bias=True, hidden_mult=4.0),
        options=dict(image_size=image, patch_size=patch, channels=channels),
        head=dict(kind="sequence_classification", num_labels=labels),
    )


_SIZES: dict[str, Callable[[], dict[str, Any]]] = {
    "gpt2-small": lambda: _gpt2(12, 768, 12),
    "gpt2-medium": lambda: _gpt2(24, 1024, 16),
    "gpt2-tiny": lambda: _gpt2(2, 64, 4, vocab=512, ctx=128),
    "llama-tiny": lambda: _llama(2, 64, 4, 2, 176, vocab=512, ctx=256),
    "llama-small": lambda: _llama(12, 768, 12, 4, 2048, vocab=32000, ctx=2048),
    "smollm2-135m": lambda: _llama(30, 576, 9, 3, 1536, vocab=49152, ctx=8192, base=100000.0) | {"tie_embeddings": True},
    "bert-base": lambda: _bert(12, 768, 12),
    "bert-tiny": lambda: _bert(2, 64, 4, vocab=512, ctx=128),
    "minilm-l6": lambda: _bert(6, 384, 12),
    "t5-small": lambda: _t5(6, 512, 8, 2048),
    "t5-tiny": lambda: _t5(2, 64, 4, 128, vocab=512, ctx=128),
    "transformer-base": lambda: _transformer(6, 512, 8, vocab=37000, ctx=512),
    "vit-base": lambda: _vit(12, 768, 12, 224, 16),
    "vit-tiny": lambda: _vit(2, 64, 4, 28, 7, channels=1, labels=10),
    "transformer-tiny": lambda: _transformer(2, 64, 4, vocab=512, ctx=128),
}
for _name, _fn in _SIZES.items():
    PRESETS.register(_name)(_fn)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset with fields overridden by keyword; a section given as
    a mapping (`attention={"kind": "linear"}`) updates only the keys it names, and a `kind`
    switched without `options` drops the previous kind's options (with a warning)."""
    try:
        data = PRESETS.get(name)()
    except KeyError as e:
        raise ConfigError(str(e)) from None
    data = to_dict(from_dict(ModelConfig, data))  # every field, so that overrides merge into defaults too
    overrides = {k: to_dict(v) for k, v in overrides.items()}
    return from_dict(ModelConfig, merge_sections(data, overrides, "model"), "model").validate()
