"""The one place where a ModelConfig becomes modules: `build_model` looks up the registered
architecture (`model.arch`) and hands it the config's `Parts`."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig
from ..registry import RegistryError
from .parts import Parts
from .registry import ARCHITECTURES, MEMORIES


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases, unit norms; then every
    module's own `reset_extra_parameters()` (parameters a variant initialises its own way)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=std)
    for mod in model.modules():
        reset = getattr(mod, "reset_extra_parameters", None)
        if reset is not None:
            reset()


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model a config describes (DecoderLM, EncoderModel, EncoderDecoder,
    VisionTransformer, or any registered architecture)."""
    cfg.validate()
    try:
        model = ARCHITECTURES.get(cfg.arch)(cfg, Parts(cfg))
        model = MEMORIES.get(cfg.memory.kind)(model, cfg)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    init_weights(model, cfg.init_std)
    return model


def build_block(cfg: ModelConfig, *, causal: bool, cross: bool = False, layer_index: int = 0) -> nn.Module:
    """One block of the configured kind (for converters and tests that build a single layer)."""
    parts = Parts(cfg)
    return parts.block(parts.context(causal=causal, cross=cross, layer_index=layer_index, num_layers=cfg.num_layers))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["build_model", "build_block", "count_parameters", "init_weights"]
