"""Tasks: what a run trains for. A task owns its data pipeline, loss, evaluation and metrics;
the trainer is one loop for all of them. Each task is one file here registering itself in
TASKS (tasks/base.py); a run selects it with `task.kind`."""

from __future__ import annotations

from ..registry import discover
from .base import TASKS, Task

discover(__name__, __path__)

__all__ = ["TASKS", "Task"]
