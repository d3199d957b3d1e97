"""The contract of every registered task's declarations, tested by being registered: the
architectures it trains exist; its options dataclass (if any) builds with its defaults; its
loss unit, use command, named commands, generation mode and prediction settings are ones the
commands can act on (a named command exists in the CLI; a task that reads prediction inputs
answers them; each setting's default fits its type)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from anyformer.cli import build_parser
from anyformer.models import ARCHITECTURES
from anyformer.tasks import TASKS, Task

NAMES = [name for name in TASKS.names() if TASKS.get(name).__module__.startswith("anyformer.")]


def cli_commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_task_is_covered() -> None:
    assert {"causal_lm", "masked_lm", "image_classification", "point_cloud_classification", "sequence_to_sequence"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_task_declarations_are_usable(name: str) -> None:
    task = TASKS.get(name)
    assert task.architectures and all(a in ARCHITECTURES for a in task.architectures), task.architectures
    if task.options_class is not None:
        assert dataclasses.is_dataclass(task.options_class)
        task.options_class()  # every option has a default
    assert task.loss_unit in ("nats/token", "nats/example")
    commands = cli_commands()
    assert all(c in commands for c in task.commands), (task.commands, sorted(commands))
    if task.use_command is not None:
        assert task.use_command.startswith("anyformer ") and "RUN" in task.use_command
        assert task.use_command.split()[1] in commands
    assert task.generates in (None, "next_token", "diffusion")
    if task.generates is not None:
        assert task.has_tokenizer  # generate writes text with the run's tokenizer
    if task.predict_input is not None:
        assert task.predict_inputs is not Task.predict_inputs, "a task that reads prediction inputs must answer them"
    for setting_name, setting in task.predict_settings.items():
        assert setting_name.isidentifier() and setting.help
        assert setting.default is None or isinstance(setting.default, setting.type), (setting_name, setting)
