"""What `anyformer predict` and the commands named for a task (classify, translate, fill-mask,
name-function) share: load a run, check its task makes predictions (for that command), turn
settings into the task's typed values, print the task's lines."""

from __future__ import annotations

import sys
from typing import Any


def load_served_run(run_dir: str, checkpoint: str, device: str, command: str, why: str = "") -> tuple[Any, Any]:
    """(the loaded run, its task) for a run whose task `command` serves (`Task.commands`);
    another run raises, naming the tasks the command serves and the commands of that run."""
    from ..tasks import TASKS
    from ..training.run import load_run

    r = load_run(run_dir, checkpoint, device)
    kind = r.cfg.task.kind
    task_class = TASKS.get(kind)
    if command not in task_class.commands:
        served = [n for n in TASKS.names() if command in TASKS.get(n).commands]
        raise ValueError(f"{run_dir} was trained for task {kind!r}; {command} needs a {' or '.join(served)} run{why}. "
                         f"Use: {task_class.next_commands(run_dir)}")
    return r, task_class(r.cfg)


def load_predicting_run(run_dir: str, checkpoint: str, device: str) -> tuple[Any, Any]:
    """(the loaded run, its task) for a run whose task makes predictions (`Task.predict_input`)."""
    from ..tasks import TASKS
    from ..training.run import load_run

    r = load_run(run_dir, checkpoint, device)
    task_class = TASKS.get(r.cfg.task.kind)
    if task_class.predict_input is None:
        raise ValueError(f"{run_dir} was trained for task {r.cfg.task.kind!r}, whose runs `predict` does not serve; "
                         f"use: {task_class.next_commands(run_dir)}")
    return r, task_class(r.cfg)


def task_settings(task: Any, given: dict[str, Any], *, flag: bool = False) -> dict[str, Any]:
    """Every setting of the task's predictions: `given` values (already typed, or texts to
    parse) over the defaults. A given setting the task does not take raises, listing those it
    does; None values count as not given. `flag`: name them as --flags in errors."""
    known = task.predict_settings
    out = {name: s.default for name, s in known.items()}
    for name, value in given.items():
        if value is None:
            continue
        if name not in known:
            shown = [f"--{n.replace('_', '-')}" if flag else n for n in known] or ["none"]
            what = f"--{name.replace('_', '-')}" if flag else f"setting {name!r}"
            raise ValueError(f"{what} does not apply to task {task.cfg.task.kind!r} (its settings: {', '.join(shown)})")
        out[name] = known[name].parse(name, value) if isinstance(value, str) and known[name].type is not str else value
    return out


def print_predictions(r: Any, task: Any, inputs: list[str], settings: dict[str, Any]) -> int:
    """Print the task's lines for `inputs` ("-" alone: one input per line of standard input)."""
    if inputs == ["-"]:
        inputs = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not inputs:
            raise ValueError("standard input holds no inputs (one per line)")
    for line in task.predict_inputs(r.model, r.tokenizer, inputs, settings):
        print(line)
    return 0
