"""Block kinds; every module here registers its kinds in `anyformer.models.registry.BLOCKS`."""

from ...registry import discover

discover(__name__, __path__)
