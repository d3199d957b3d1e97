"""Models: decoder LM, encoder, encoder-decoder; builders and presets."""

from .builders import build_model, count_parameters
from .decoder import DecoderLM
from .encoder import EncoderModel
from .encoder_decoder import EncoderDecoder
from .presets import PRESETS, preset

__all__ = ["build_model", "count_parameters", "DecoderLM", "EncoderModel", "EncoderDecoder", "PRESETS", "preset"]
