"""Weight conversion: Hugging Face model directories and state dicts, and torch.nn layers."""

from .hf import ConversionError, model_from_hf, model_to_hf, state_dict_from_hf, state_dict_to_hf
from .hf_config import config_from_hf, config_to_hf, family_of, family_of_hf
from .pretrained import from_pretrained, load_weights, save_pretrained

__all__ = [
    "ConversionError",
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
