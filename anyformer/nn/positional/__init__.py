"""Positional encodings; every module of this package is imported, so each kind (and any new
file) registers itself in POSITIONALS."""

from ...registry import discover
from .base import POSITIONALS, NoPositional, PositionalContext, PositionalEncoding, uses_absolute_positions

discover(__name__, __path__)

__all__ = ["POSITIONALS", "PositionalEncoding", "PositionalContext", "NoPositional", "uses_absolute_positions"]
