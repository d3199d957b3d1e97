"""Hugging Face ViT (ViTModel / ViTForImageClassification) <-> anyformer VisionTransformer."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import ConfigError, ModelConfig, from_dict
from .hf_config import HF_READERS, HFReader

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def vit_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """An anyformer ViT config from a Hugging Face ViTConfig dict (config.json)."""
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise ConfigError(f"ViT hidden_act {act!r} is not supported; supported: {', '.join(_HF_ACT)}")
    image, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
    labels = len(hf.get("id2label", {})) if (hf.get("architectures") or [""])[0] == "ViTForImageClassification" else 0
    return from_dict(
        ModelConfig,
        dict(
            arch="vit", vocab_size=1, dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            max_seq_len=(image // patch) ** 2 + 1,
            attention=dict(num_heads=hf["num_attention_heads"], bias=hf.get("qkv_bias", True), out_bias=True),
            positional=dict(kind="learned"),
            norm=dict(kind="layernorm", eps=hf.get("layer_norm_eps", 1e-12), placement="pre"),
            ffn=dict(kind="mlp", activation=_HF_ACT[act], bias=True, hidden_dim=hf["intermediate_size"]),
            options=dict(image_size=image, patch_size=patch, channels=hf.get("num_channels", 3)),
            head=dict(kind="sequence_classification" if labels else "none", num_labels=labels or 2),
        ),
    ).validate()


def vit_state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename (and reshape) a Hugging Face ViT state dict to anyformer's names.

    Raises ConfigError naming any tensor it does not know how to place.
    """
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    out: dict[str, Tensor] = {
        "patches.cls": sd.pop("embeddings.cls_token"),
        "patches.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patches.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "positional.table.weight": sd.pop("embeddings.position_embeddings")[0],
        "stack.final_norm.weight": sd.pop("layernorm.weight"),
        "stack.final_norm.bias": sd.pop("layernorm.bias"),
    }
    # checkpoint names (encoder.layer.i.*) and transformers 5 module names (layers.i.*)
    names = {
        "attention.q_proj": "attn.sublayer.q_proj",
        "attention.k_proj": "attn.sublayer.k_proj",
        "attention.v_proj": "attn.sublayer.v_proj",
        "attention.o_proj": "attn.sublayer.o_proj",
        "mlp.fc1": "ffn.sublayer.up",
        "mlp.fc2": "ffn.sublayer.down",
        "attention.attention.query": "attn.sublayer.q_proj",
        "attention.attention.key": "attn.sublayer.k_proj",
        "attention.attention.value": "attn.sublayer.v_proj",
        "attention.output.dense": "attn.sublayer.o_proj",
        "layernorm_before": "attn.norm",
        "intermediate.dense": "ffn.sublayer.up",
        "output.dense": "ffn.sublayer.down",
        "layernorm_after": "ffn.norm",
    }
    for i in range(cfg.num_layers):
        for hf_name, ours in names.items():
            for p in ("weight", "bias"):
                for prefix in ("encoder.layer", "layers"):
                    key = f"{prefix}.{i}.{hf_name}.{p}"
                    if key in sd:
                        out[f"stack.blocks.{i}.{ours}.{p}"] = sd.pop(key)
    for p in ("weight", "bias"):
        if f"classifier.{p}" in sd:
            out[f"head.classifier.{p}"] = sd.pop(f"classifier.{p}")
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}  # ViTModel's unused pooler
    if sd:
        raise ConfigError(f"unexpected ViT tensors that anyformer cannot place: {', '.join(sorted(sd)[:5])}")
    return out


HF_READERS.register("vit")(HFReader(vit_config_from_hf, vit_state_dict_from_hf, ("ViTModel", "ViTForImageClassification")))
