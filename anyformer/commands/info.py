"""`anyformer info CONFIG_OR_RUN_OR_PRESET`: a model summary (parameters, FLOPs, memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    p = subparsers.add_parser("info", help="summarise a model from a config, a run folder or a preset name")
    p.add_argument("target", help="run config YAML, model config YAML, run folder, or preset name (e.g. gpt2-small)")
    p.add_argument("--batch", type=at_least(1), default=1, help="batch size for the activation estimate")
    p.add_argument("--seq-len", type=at_least(1), default=None, help="context for FLOPs (default: train.seq_len or max_seq_len)")
    p.set_defaults(func=run, accepts_overrides=True)


def resolve_model_config(target: str, overrides: list[str]):  # type: ignore[no-untyped-def]
    """(ModelConfig, training context or None, description) of a config file, run folder or preset."""
    from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml, read_yaml
    from ..models.presets import PRESETS, preset
    from ..training.config import RunConfig

    p = Path(target)
    checkpoint = _checkpoint(target)
    if checkpoint is not None:  # a Hugging Face folder, a GGUF file or an installed package shipping one, as `generate --model` reads
        return apply_overrides(checkpoint[0], overrides), None, checkpoint[1]
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise FileNotFoundError(f"{target!r} is a folder without config.yaml; give a run folder written by `anyformer train`")
        p = p / "config.yaml"
    if p.is_file():
        data = read_yaml(p) or {}
        if isinstance(data, dict) and {"model", "data", "train"} & set(data):
            run = apply_overrides(load_yaml(RunConfig, p), overrides)
            return run.model, run.train.seq_len, f"run config {p}"
        model = apply_overrides(from_dict(ModelConfig, data), overrides)
        return model, None, f"model config {p}"
    if target in PRESETS:
        return apply_overrides(preset(target), overrides), None, f"preset {target}"
    if target.endswith((".yaml", ".yml")) or "/" in target:
        raise FileNotFoundError(f"{target!r} does not exist")
    raise ConfigError(f"{target!r} is not a file, a run folder, a checkpoint (a Hugging Face folder, a .gguf file or an installed "
                      f"package shipping one) or a preset; presets: {', '.join(PRESETS.names())}")


def _checkpoint(target: str):  # type: ignore[no-untyped-def]
    """(ModelConfig, description) of a pretrained checkpoint `target` names, or None when it
    names none: a folder with a Hugging Face config.json, a GGUF file, or an installed package
    shipping either. Only the config is read (no weights)."""
    import json

    from ..convert import config_from_hf
    from ..pretrained.gguf import gguf_hf_config, is_gguf_file
    from ..pretrained.loading import _packaged_checkpoint

    p = Path(target)
    if not p.exists():
        packaged = _packaged_checkpoint(target)
        if packaged is None:
            return None
        p = packaged
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return config_from_hf(json.loads((p / "config.json").read_text())), f"Hugging Face checkpoint {p}"
    if is_gguf_file(p):
        return config_from_hf(gguf_hf_config(p)), f"GGUF checkpoint {p}"
    return None


def run(args: argparse.Namespace) -> int:
    """Print the summary and the layer shapes of the first block."""
    import torch

    from ..models.builders import build_model
    from ..models.summary import summarize

    cfg, train_len, what = resolve_model_config(args.target, args.overrides)
    seq_len = args.seq_len or train_len or cfg.max_seq_len
    with torch.device("meta"):
        model = build_model(cfg)
    print(f"{what}: {cfg.arch}, {cfg.num_layers} layers, width {cfg.dim}, {cfg.attention.num_heads} heads "
          f"({cfg.num_kv_heads} kv), attention {cfg.attention.kind}/{cfg.attention.kernel}, positional "
          f"{cfg.positional.kind}, norm {cfg.norm.kind} ({cfg.norm.placement}), ffn {cfg.ffn.kind}, vocab {cfg.vocab_size}")
    print(summarize(model, args.batch, seq_len))
    print("first block:")
    blocks = getattr(getattr(model, "stack", None) or getattr(model, "encoder", None), "blocks", [])
    for name, p in (blocks[0].named_parameters() if len(blocks) else []):
        print(f"  {name:40s} {tuple(p.shape)}")
    return 0
