"""Answers to "the context is too short": ways to run or train models on inputs longer than
the context they were built for."""

from .lm_infinite import LMInfiniteOptions, apply_lm_infinite, lm_infinite_attention, remove_lm_infinite

__all__ = ["LMInfiniteOptions", "apply_lm_infinite", "lm_infinite_attention", "remove_lm_infinite"]
