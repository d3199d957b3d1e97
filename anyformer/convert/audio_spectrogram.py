"""Hugging Face AST (ASTForAudioClassification) -> anyformer AudioSpectrogramTransformer.

The encoder follows ViT's layout, so its tensors are placed by the ViT converter; the
distillation token and the pooled head are AST's own."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, from_dict
from .hf_config import HF_READERS, HFReader
from .vit import _HF_ACT, vit_state_dict_from_hf


def ast_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """An anyformer `ast` config from a Hugging Face ASTConfig dict (config.json)."""
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise ConfigError(f"AST hidden_act {act!r} is not supported; supported: {', '.join(_HF_ACT)}")
    options = dict(mel_bins=hf.get("num_mel_bins", 128), frames=hf.get("max_length", 1024), patch_size=hf.get("patch_size", 16),
                   frequency_stride=hf.get("frequency_stride", 10), time_stride=hf.get("time_stride", 10), distillation=True)
    cfg = dict(
        arch="ast", vocab_size=1, dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"], max_seq_len=1, options=options,
        attention=dict(num_heads=hf["num_attention_heads"], bias=hf.get("qkv_bias", True), out_bias=True),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=hf.get("layer_norm_eps", 1e-12), placement="pre"),
        ffn=dict(kind="mlp", activation=_HF_ACT[act], bias=True, hidden_dim=hf["intermediate_size"]),
        head=dict(kind="sequence_classification", num_labels=len(hf.get("id2label", {})) or 2),
    )
    cfg["max_seq_len"] = from_dict(ModelConfig, {**cfg, "max_seq_len": 10**9}).arch_options.num_tokens
    return from_dict(ModelConfig, cfg).validate()


def ast_state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename a Hugging Face ASTForAudioClassification state dict to anyformer's names; raises
    ConfigError naming any tensor it cannot place."""
    sd = {k.removeprefix("audio_spectrogram_transformer."): v for k, v in sd.items()}
    distill = sd.pop("embeddings.distillation_token")
    head = {f"head.norm.{p}": sd.pop(f"classifier.layernorm.{p}") for p in ("weight", "bias")}
    head |= {f"head.classifier.{p}": sd.pop(f"classifier.dense.{p}") for p in ("weight", "bias")}
    out = vit_state_dict_from_hf(sd, cfg)  # the encoder, the class token, the patches and the positions
    out["patches.cls"] = torch.cat([out["patches.cls"], distill], 1)  # (1, 2, d): class, then distillation
    return out | head


HF_READERS.register("audio-spectrogram-transformer")(HFReader(ast_config_from_hf, ast_state_dict_from_hf, ("ASTForAudioClassification",)))
