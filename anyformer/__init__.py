"""anyformer: build, train, run and compare Transformers of every kind."""

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
