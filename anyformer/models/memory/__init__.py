"""Memory kinds: segment recurrence wrapped around a whole model; every module here registers
its kinds in `anyformer.models.registry.MEMORIES` (`model.memory.kind`)."""

from ...registry import discover

discover(__name__, __path__)
