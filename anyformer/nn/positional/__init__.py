"""Positional encodings; importing this package registers every kind."""

from . import absolute, bias, rope  # noqa: F401  (registration)
from .base import POSITIONALS, NoPositional, PositionalContext, PositionalEncoding, uses_absolute_positions

__all__ = ["POSITIONALS", "PositionalEncoding", "PositionalContext", "NoPositional", "uses_absolute_positions"]
