"""Real pretrained checkpoints: GGUF files and Hugging Face model directories, and their tokenizers."""

from .gguf import GGUFCheckpoint, find_packaged_gguf, gguf_metadata, is_gguf_file, load_gguf
from .loading import from_pretrained, load_pretrained
from .tokenizer import PretrainedTokenizer, load_tokenizer, render_chat_template

__all__ = [
    "GGUFCheckpoint",
    "PretrainedTokenizer",
    "find_packaged_gguf",
    "from_pretrained",
    "load_pretrained",
    "gguf_metadata",
    "is_gguf_file",
    "load_gguf",
    "load_tokenizer",
    "render_chat_template",
]
