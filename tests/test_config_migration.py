"""Architectures own their options (`model.arch` + `model.options`), and configs written before
that still load: a ViT run folder written by the earlier layout (its settings in `model.vision`,
unused `model.points` / `model.megabyte` defaults beside them) loads, builds the same model
and evaluates; old sections move into `model.options` only for the architecture that owned them."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyformer.cli import main
from anyformer.config import ConfigError, ModelConfig, apply_overrides, from_dict, to_dict
from anyformer.models import build_model
from anyformer.training.config import RunConfig, default_run_config
from anyformer.training.run import load_run

OLD_RUN = Path(__file__).parent / "fixtures" / "vit_run_before_arch_options"

# the sections every model config held before, at their old defaults
OLD_DEFAULTS = {
    "megabyte": {"patch_size": 4, "local_dim": None, "local_layers": 2, "local_heads": None},
    "vision": {"image_size": 224, "patch_size": 16, "channels": 3},
    "points": {"num_points": 1024, "num_groups": 64, "group_size": 32, "widths": [64, 128], "position_hidden": 128},
}


def test_old_vit_run_loads_with_its_vision_settings_as_options() -> None:
    r = load_run(OLD_RUN, device="cpu")
    assert r.cfg.model.options == {"image_size": 8, "patch_size": 4, "channels": 1}
    v = r.cfg.model.arch_options
    assert (v.image_size, v.patch_size, v.channels, v.num_patches) == (8, 4, 1, 4)
    assert r.tokenizer is None  # an image task saves no tokenizer


def test_old_vit_run_builds_the_model_its_weights_were_saved_from() -> None:
    """The migrated config and one written by hand in the new layout build the same model: the
    saved weights load strictly into the hand-written one and give the same logits."""
    r = load_run(OLD_RUN, device="cpu")
    new = from_dict(ModelConfig, {**{k: v for k, v in to_dict(r.cfg.model).items()},
                                  "options": {"image_size": 8, "patch_size": 4, "channels": 1}})
    model = build_model(new).eval()
    model.load_state_dict(load_file(str(r.checkpoint / "model.safetensors")), strict=True)
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), r.model(images))


def test_old_vit_run_evaluates(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    assert main(["eval", str(run), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "task image_classification" in out and "accuracy" in out


def test_old_sections_move_only_for_their_architecture() -> None:
    base = to_dict(default_run_config().model)
    for arch, section, options in [("vit", "vision", {"image_size": 8, "patch_size": 4, "channels": 1}),
                                   ("megabyte", "megabyte", {"patch_size": 8, "local_dim": 16, "local_layers": 1, "local_heads": 2}),
                                   ("point_cloud", "points", {"num_points": 64, "num_groups": 8, "group_size": 8,
                                                              "widths": [8], "position_hidden": 8})]:
        old = {**base, **OLD_DEFAULTS, "arch": arch, section: options}
        old.pop("options")
        assert from_dict(ModelConfig, old).options == options
    decoder = {**base, **OLD_DEFAULTS}
    decoder.pop("options")
    assert from_dict(ModelConfig, decoder) == default_run_config().model  # the unused defaults are dropped
    given = {**base, "arch": "vit", "options": {"image_size": 16}, "vision": {"image_size": 8}}
    assert from_dict(ModelConfig, given).options == {"image_size": 16}  # options given in the new layout win


def test_architecture_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"model.options: architecture 'decoder' takes no options; got image_size"):
        ModelConfig(arch="decoder", options={"image_size": 8}).validate()
    with pytest.raises(ConfigError, match=r"unknown config key 'model.options \(vit\).image_sise'; valid keys here: image_size"):
        ModelConfig(arch="vit", options={"image_sise": 8}).validate()
    with pytest.raises(ConfigError, match=r"model.options.image_size=30 is not a multiple of model.options.patch_size=16"):
        ModelConfig(arch="vit", max_seq_len=512, options={"image_size": 30}).validate()
    with pytest.raises(ConfigError, match=r"model.options.patch_size=5 must divide model.max_seq_len=64"):
        build_model(ModelConfig(arch="megabyte", max_seq_len=64, options={"patch_size": 5}))


def test_switching_architecture_drops_the_old_ones_options() -> None:
    vit = apply_overrides(default_run_config(), ["--model.arch=vit", "--model.max_seq_len=197", "--model.options.image_size=224"])
    assert vit.model.options == {"image_size": 224}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = apply_overrides(vit, ["--model.arch=decoder"])
    assert back.model.options == {} and "dropping the options of 'vit' (image_size)" in str(caught[0].message)
    assert isinstance(back, RunConfig)


def test_old_sample_settings_move_to_the_tasks_that_write_text() -> None:
    """Configs written when `train` held the end-of-run sample settings: a text-writing task
    (causal LM, masked diffusion) gets them as task options, other tasks drop them."""
    old_train = {"samples": 2, "sample_tokens": 40, "sample_prompt": "KING:", "temperature": 0.5, "top_k": 7}
    causal = from_dict(RunConfig, {"train": dict(old_train)})
    assert causal.task.kind == "causal_lm" and causal.train.samples == 2
    assert causal.task.options == {"sample_tokens": 40, "sample_prompt": "KING:", "temperature": 0.5, "top_k": 7}
    diffusion = from_dict(RunConfig, {"train": dict(old_train), "task": {"kind": "masked_diffusion", "options": {"eps": 0.01}}})
    assert diffusion.task.options == {"sample_tokens": 40, "sample_prompt": "KING:", "temperature": 0.5, "top_k": 7, "eps": 0.01}
    given = from_dict(RunConfig, {"train": dict(old_train), "task": {"options": {"sample_tokens": 9}}})
    assert given.task.options["sample_tokens"] == 9  # a value given in the new place wins
    images = from_dict(RunConfig, {"train": dict(old_train), "task": {"kind": "image_classification"}})
    assert images.task.options == {} and images.train.samples == 2
    r = load_run(OLD_RUN, device="cpu")  # the fixture's train section holds the old sample settings
    assert r.cfg.task.options == {}
