"""Models: architectures (decoder LM, encoder, encoder-decoder, ViT, ...), block kinds, depth
wirings and heads, each a registry (registry.py); builders and presets. Every module and
subpackage here is imported, so a new variant file registers itself."""

from ..registry import discover
from .builders import build_model, count_parameters
from .decoder import DecoderLM
from .encoder import EncoderModel
from .encoder_decoder import EncoderDecoder
from .presets import PRESETS, preset
from .registry import ARCHITECTURES, BLOCKS, DEPTHS, HEADS

discover(__name__, __path__)

__all__ = [
    "build_model", "count_parameters", "DecoderLM", "EncoderModel", "EncoderDecoder", "PRESETS", "preset",
    "ARCHITECTURES", "BLOCKS", "DEPTHS", "HEADS",
]
