"""Vision Transformer (Dosovitskiy et al. 2021): image patches as tokens, a class token, an
encoder stack and a classification head.

Legend: `b` batch, `c` channels, `H`/`W` image size, `p` patch size, `P` patches, `d` width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..nn.positional import PositionalEncoding
from .common import Stack
from .encoder_classifier import EncoderClassifier
from .parts import Parts
from .registry import ARCHITECTURES, moved_section


@dataclass
class VitOptions:
    """`model.options` of arch `vit`: square images of `image_size` pixels and `channels`,
    cut into square patches of `patch_size`."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when the patches do not tile the image or exceed the context."""
        if min(self.image_size, self.patch_size, self.channels) < 1:
            raise ConfigError(f"model.options.image_size, patch_size and channels must be at least 1 (got {self.image_size}, "
                              f"{self.patch_size}, {self.channels})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.options.image_size={self.image_size} is not a multiple of model.options.patch_size={self.patch_size}")
        if cfg.max_seq_len < self.num_patches + 1:
            raise ConfigError(f"model.max_seq_len={cfg.max_seq_len} is shorter than the {self.num_patches} patches plus the class "
                              "token; set it to at least num_patches + 1")


moved_section("vit", "vision")


class PatchEmbedding(nn.Module):
    """Cut images into p x p patches, project each to width d, prepend a learned class token."""

    def __init__(self, channels: int, patch_size: int, dim: int, image_size: int, *, dropout: float) -> None:
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, images: Tensor, positional: PositionalEncoding) -> tuple[Tensor, Tensor]:
        """images (b, c, H, W) -> tokens (b, 1 + P, d) and their positions (b, 1 + P)."""
        if images.dim() != 4 or images.shape[1] != self.channels or images.shape[-2:] != (self.image_size,) * 2:
            raise ValueError(
                f"images have shape {tuple(images.shape)}; expected (batch, {self.channels}, "
                f"{self.image_size}, {self.image_size})"
            )
        x = self.proj(images).flatten(2).transpose(1, 2)  # (b, P, d)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (b, 1 + P, d)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.dropout(positional.embed(x, positions)), positions


class ImageClassificationHead(nn.Module):
    """Logits (b, classes) from the class token (pooling "cls") or the mean of the patch
    tokens ("mean"); with no classes, that pooled state itself."""

    def __init__(self, dim: int, num_labels: int, pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = pooling
        self.classifier = nn.Linear(dim, num_labels) if num_labels > 0 else nn.Identity()

    def forward(self, hidden: Tensor) -> Tensor:  # (b, 1 + P, d) -> (b, classes)
        return self.classifier(hidden[:, 1:].mean(1) if self.pooling == "mean" else hidden[:, 0])


class VisionTransformer(EncoderClassifier):
    """ViT: patch embedding -> bidirectional encoder blocks -> final norm -> head; images (b, c,
    H, W) in, class logits (b, num_labels) out, final states (b, 1 + P, d) from `hidden`."""

    def __init__(
        self, config: ModelConfig, patches: PatchEmbedding, positional: PositionalEncoding, stack: Stack, head: nn.Module
    ) -> None:
        super().__init__(config, "patches", patches, positional, stack, head)

    def tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.patches(images, self.positional)

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random images of the configured size."""
        v: VitOptions = self.config.arch_options
        images = torch.rand(batch, v.channels, v.image_size, v.image_size, generator=generator) * 2 - 1
        return (images.to(self.input_device()),)

    def tokens_per_input(self) -> int:
        return self.config.arch_options.num_patches + 1


@ARCHITECTURES.register("vit", options=VitOptions)
def build_vit(cfg: ModelConfig, parts: Parts) -> VisionTransformer:
    """A Vision Transformer classifying images (the class token's final state when
    head.kind is not sequence_classification)."""
    v: VitOptions = cfg.arch_options
    return VisionTransformer(
        cfg,
        PatchEmbedding(v.channels, v.patch_size, cfg.dim, v.image_size, dropout=cfg.dropout),
        parts.positional(causal=False),
        parts.stack(cfg.num_layers, causal=False, name="encoder"),
        ImageClassificationHead(cfg.dim, cfg.head.num_labels if cfg.head.kind == "sequence_classification" else 0, cfg.head.pooling),
    )
