"""The contract of every registered architecture's options, tested by being registered: its
options dataclass (if it has one) builds with its defaults and round-trips through
`model.options`, an unknown option key is refused naming the valid ones, and an architecture
without options refuses any."""

from __future__ import annotations

import dataclasses

import pytest

from anyformer import ConfigError, ModelConfig
from anyformer.config import from_dict, to_dict
from anyformer.models import ARCHITECTURES

NAMES = [name for name in ARCHITECTURES.names() if ARCHITECTURES.get(name).__module__.startswith("anyformer.")]


def test_every_architecture_is_covered() -> None:
    assert {"decoder", "encoder", "encoder_decoder", "vit", "point_cloud", "megabyte"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_options_are_its_own(name: str) -> None:
    options = ARCHITECTURES.options_of(name)
    if options is None:
        with pytest.raises(ConfigError, match=f"architecture '{name}' takes no options"):
            _ = ModelConfig(arch=name, options={"size": 1}).arch_options
        return
    assert dataclasses.is_dataclass(options)
    defaults = dataclasses.asdict(options())
    cfg = ModelConfig(arch=name, options=defaults)
    assert cfg.arch_options == options() and from_dict(ModelConfig, to_dict(cfg)).arch_options == options()
    first = next(iter(defaults))
    with pytest.raises(ConfigError, match=rf"unknown config key 'model.options \({name}\).no_such_option'; valid keys here: {first}"):
        _ = ModelConfig(arch=name, options={"no_such_option": 1}).arch_options
