"""Audio Spectrogram Transformer (Gong et al. 2021, AST): a log-mel spectrogram cut into
overlapping square patches across frequency and time, a class token and (optionally) a
distillation token, an encoder stack, and a head on the mean of those tokens' final states.

Legend: `b` batch, `T` frames, `F` mel bins, `p` patch size, `P` patches, `d` width.
Patches: a (p x p) convolution with strides (frequency_stride, time_stride) over the (F, T)
spectrogram, flattened frequency-major; P = ((F - p) // sf + 1) * ((T - p) // st + 1).
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
from .registry import ARCHITECTURES


@dataclass
class AstOptions:
    """`model.options` of arch `ast`: spectrograms of `frames` frames of `mel_bins` bins, cut
    into `patch_size` squares every `frequency_stride` bins and `time_stride` frames; with
    `distillation` a second learned token beside the class token (pooled together)."""

    mel_bins: int = 128
    frames: int = 1024
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    distillation: bool = True

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency, time) patch counts."""
        return ((self.mel_bins - self.patch_size) // self.frequency_stride + 1, (self.frames - self.patch_size) // self.time_stride + 1)

    @property
    def num_tokens(self) -> int:
        """Patches plus the class (and distillation) token."""
        f, t = self.grid
        return f * t + 1 + int(self.distillation)

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when the patches do not fit the spectrogram or the context."""
        if min(self.mel_bins, self.frames, self.patch_size, self.frequency_stride, self.time_stride) < 1:
            raise ConfigError("model.options: mel_bins, frames, patch_size and both strides must be at least 1")
        if self.patch_size > min(self.mel_bins, self.frames):
            raise ConfigError(f"model.options.patch_size={self.patch_size} is larger than the spectrogram "
                              f"({self.mel_bins} mel bins x {self.frames} frames)")
        if cfg.max_seq_len < self.num_tokens:
            raise ConfigError(f"model.max_seq_len={cfg.max_seq_len} is shorter than the {self.num_tokens} tokens (patches plus "
                              "class and distillation tokens); set it to at least that")


class SpectrogramPatches(nn.Module):
    """Spectrograms (b, T, F) -> tokens (b, tokens, d): overlapping patches, then the class and
    distillation tokens in front, learned positions added."""

    def __init__(self, options: AstOptions, dim: int, *, dropout: float) -> None:
        super().__init__()
        self.options = options
        p = options.patch_size
        self.proj = nn.Conv2d(1, dim, kernel_size=p, stride=(options.frequency_stride, options.time_stride))
        self.cls = nn.Parameter(torch.zeros(1, 1 + int(options.distillation), dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, spectrograms: Tensor, positional: PositionalEncoding) -> tuple[Tensor, Tensor]:
        o = self.options
        if spectrograms.dim() != 3 or spectrograms.shape[1:] != (o.frames, o.mel_bins):
            raise ValueError(f"spectrograms have shape {tuple(spectrograms.shape)}; expected (batch, {o.frames} frames, "
                             f"{o.mel_bins} mel bins)")
        x = self.proj(spectrograms.unsqueeze(1).transpose(2, 3))  # (b, d, F', T')
        x = x.flatten(2).transpose(1, 2)  # (b, P, d), frequency-major
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (b, tokens, d)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.dropout(positional.embed(x, positions)), positions


class PooledHead(nn.Module):
    """LayerNorm then Linear on the mean of the first `pooled` tokens' final states (AST's head)."""

    def __init__(self, dim: int, num_labels: int, pooled: int, eps: float) -> None:
        super().__init__()
        self.pooled = pooled
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor) -> Tensor:  # (b, tokens, d) -> (b, labels)
        return self.classifier(self.norm(hidden[:, : self.pooled].mean(1)))


class AudioSpectrogramTransformer(EncoderClassifier):
    """AST: spectrogram patches -> encoder blocks -> final norm -> pooled head; spectrograms
    (b, T, F) in, class logits (b, num_labels) out."""

    def __init__(self, config: ModelConfig, patches: SpectrogramPatches, positional: PositionalEncoding, stack: Stack,
                 head: nn.Module) -> None:
        super().__init__(config, "patches", patches, positional, stack, head)

    def tokens(self, spectrograms: Tensor) -> tuple[Tensor, Tensor]:
        return self.patches(spectrograms, self.positional)

    def example_inputs(self, batch: int, generator: torch.Generator, length: int | None = None) -> tuple[Tensor, ...]:
        """Protocol (anyformer.protocol.example_inputs): random spectrograms of the configured frames and bins."""
        o = self.patches.options
        return (torch.randn(batch, o.frames, o.mel_bins, generator=generator).to(self.input_device()),)

    def tokens_per_input(self) -> int:
        return self.patches.options.num_tokens


@ARCHITECTURES.register("ast", options=AstOptions)
def build_ast(cfg: ModelConfig, parts: Parts) -> AudioSpectrogramTransformer:
    """An Audio Spectrogram Transformer with `model.head.num_labels` classes."""
    o: AstOptions = cfg.arch_options
    return AudioSpectrogramTransformer(
        cfg,
        SpectrogramPatches(o, cfg.dim, dropout=cfg.dropout),
        parts.positional(causal=False),
        parts.stack(cfg.num_layers, causal=False, name="encoder"),
        PooledHead(cfg.dim, cfg.head.num_labels, 1 + int(o.distillation), cfg.norm.eps),
    )
