"""Corpora, token caches and batch sampling."""

from .proteins import ProteinTokenizer, read_fasta
from .text import CORPORA, load_corpus, markdown_play_to_text, shakespeare_plays, split_documents
from .tokens import TokenData, WindowSampler, prepare_tokens

__all__ = [
    "CORPORA", "TokenData", "WindowSampler", "load_corpus", "markdown_play_to_text", "prepare_tokens",
    "shakespeare_plays", "split_documents", "ProteinTokenizer", "read_fasta",
]
