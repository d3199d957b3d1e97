"""Depth wirings; every module here registers its wirings in `anyformer.models.registry.DEPTHS`."""

from ...registry import discover

discover(__name__, __path__)
