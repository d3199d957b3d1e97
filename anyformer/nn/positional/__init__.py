"""Positional encodings; importing this package registers every kind."""

from . import absolute, bias, rope  # noqa: F401  (registration)
from .base import POSITIONALS, NoPositional, PositionalContext, PositionalEncoding

__all__ = ["POSITIONALS", "PositionalEncoding", "PositionalContext", "NoPositional"]
