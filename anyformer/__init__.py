"""anyformer: build, train, run and compare Transformers of every kind."""

import os as _os

# Idle CPU worker threads sleep instead of spinning (unless the user chose otherwise): on a
# shared or oversubscribed CPU, spinning OpenMP workers slow matrix work down many times over.
# This must happen before torch loads its OpenMP runtime.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ConfigError, ModelConfig
from .convert import save_pretrained
from .pretrained import from_pretrained
from .models import DecoderLM, EncoderDecoder, EncoderModel, build_model, count_parameters, preset


def _bind_config_names() -> None:
    """Configs built in Python check their registry names (every registry is filled by now)."""
    from . import config as c
    from .models.registry import ARCHITECTURES, BLOCKS, DEPTHS, HEADS
    from .nn.attention import ATTENTIONS, KERNELS
    from .nn.block import PLACEMENTS
    from .nn.feedforward import FEEDFORWARDS
    from .nn.norm import NORMS
    from .nn.positional import POSITIONALS

    for cls, name, registry in [
        (c.ModelConfig, "arch", ARCHITECTURES), (c.AttentionConfig, "kind", ATTENTIONS), (c.AttentionConfig, "kernel", KERNELS),
        (c.PositionalConfig, "kind", POSITIONALS), (c.NormConfig, "kind", NORMS), (c.NormConfig, "placement", PLACEMENTS),
        (c.FeedForwardConfig, "kind", FEEDFORWARDS), (c.BlockConfig, "kind", BLOCKS), (c.DepthConfig, "kind", DEPTHS),
        (c.HeadConfig, "kind", HEADS),
    ]:
        c.bind_names(cls, name, registry)
    c.bind_options(c.ModelConfig, "arch", "options", ARCHITECTURES)  # each architecture's own options


_bind_config_names()

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DecoderLM",
    "EncoderDecoder",
    "EncoderModel",
    "build_model",
    "count_parameters",
    "preset",
    "from_pretrained",
    "save_pretrained",
]
