"""Weight conversion: Hugging Face model directories and state dicts, and torch.nn layers."""

from .hf import ConversionError, model_from_hf, model_to_hf, state_dict_from_hf, state_dict_to_hf
from .hf_config import HF_READERS, HFReader, config_from_hf, config_to_hf, family_of, family_of_hf
from .pretrained import from_pretrained, load_weights, save_pretrained
from ..registry import discover

discover(__name__, __path__)  # converter files register their readers (HF_READERS) on import

__all__ = [
    "ConversionError",
    "HFReader",
    "HF_READERS",
    "config_from_hf",
    "config_to_hf",
    "family_of",
    "family_of_hf",
    "from_pretrained",
    "load_weights",
    "model_from_hf",
    "model_to_hf",
    "save_pretrained",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
