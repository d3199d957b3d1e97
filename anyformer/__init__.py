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
