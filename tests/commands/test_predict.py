"""`anyformer predict RUN INPUT...`: one command for every task that makes predictions, printing
what the task prints (classify, translate, fill-mask and name-function are the same code with
their flags); settings are the task's, typed and checked; runs of other tasks are refused by
name, also by `generate` and the commands named for a task."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anyformer.cli import main
from anyformer.training import Trainer
from anyformer.training.run import load_run

from tests.helpers import FIXTURES, greedy_by_recompute
from tests.training_helpers import tiny_config

OLD_VIT = FIXTURES / "vit_run_before_arch_options"  # digits, 8x8, one channel


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "vit"
    shutil.copytree(OLD_VIT, run)
    return run


@pytest.fixture()
def digit(tmp_path: Path) -> tuple[Path, np.ndarray]:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels, mode="L").save(path)
    return path, pixels


def printed(capsys) -> list[tuple[str, float]]:
    return [(line.split()[0], float(line.split()[1])) for line in capsys.readouterr().out.splitlines()]


def test_predict_gives_the_models_label_probabilities(vit_run: Path, digit, capsys) -> None:
    path, pixels = digit
    assert main(["predict", str(vit_run), str(path)]) == 0
    rows = printed(capsys)
    model = load_run(vit_run, device="cpu").model
    with torch.no_grad():  # the image as the data sets hold it: gray levels 0..255 scaled to [-1, 1]
        probs = model(torch.tensor(pixels, dtype=torch.float32)[None, None] / 127.5 - 1).softmax(-1)[0]
    expected = sorted(((str(i), float(p)) for i, p in enumerate(probs)), key=lambda r: -r[1])
    assert [r[0] for r in rows] == [r[0] for r in expected]
    assert [r[1] for r in rows] == pytest.approx([r[1] for r in expected], abs=6e-4)  # printed with 3 decimals
    assert main(["classify", str(vit_run), str(path)]) == 0
    assert printed(capsys) == rows  # the named command is the same prediction


def test_predict_settings_are_the_tasks(vit_run: Path, digit, capsys) -> None:
    path, _ = digit
    assert main(["predict", str(vit_run), str(path), "--set", "top=2", "--set", "invert=true"]) == 0
    top = printed(capsys)
    assert len(top) == 2
    assert main(["classify", str(vit_run), str(path), "--invert", "--top", "2"]) == 0
    assert printed(capsys) == top
    assert main(["predict", str(vit_run), str(path), str(path)]) == 0
    assert capsys.readouterr().out.count(f"== {path}") == 2  # one block per input
    assert main(["predict", str(vit_run), "--list-settings"]) == 0
    listing = capsys.readouterr().out
    assert "an image file" in listing and "--set top=" in listing and "--set invert=" in listing
    for bad, message in [(["--set", "beams=2"], "setting 'beams' does not apply to task 'image_classification' (its settings: top, invert)"),
                         (["--set", "top=two"], "setting top takes an integer, got 'two'"),
                         (["--set", "invert=maybe"], "setting invert takes true or false"),
                         (["--set", "top"], "must look like NAME=VALUE")]:
        assert main(["predict", str(vit_run), str(path), *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", str(vit_run)]) == 2
    assert "reads an image file" in capsys.readouterr().err


def test_commands_refuse_runs_of_other_tasks_by_name(vit_run: Path, capsys) -> None:
    for argv, message in [(["generate", str(vit_run)], "'image_classification', which writes no text; generate needs a causal_lm or masked_diffusion run"),
                          (["translate", str(vit_run), "text"], "translate needs a sequence_to_sequence run"),
                          (["fill-mask", str(vit_run), "M<mask>K"], "fill-mask needs a masked_lm run"),
                          (["infill", str(vit_run), "a", "b", "--length", "2"], "infill needs a masked_diffusion run")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and f"anyformer classify {vit_run} IMAGE.png" in err  # and what does serve the run


def test_predict_continues_a_prompt_as_greedy_recompute(tmp_path: Path, capsys) -> None:
    Trainer(tiny_config(tmp_path), run_dir=tmp_path / "run", verbose=False).fit()
    run = str(tmp_path / "run")
    assert main(["predict", run, "KING", "--set", "temperature=0", "--set", "max_new_tokens=12"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    r = load_run(run, device="cpu")
    ids = r.tokenizer.encode("KING")
    assert text == r.tokenizer.decode(greedy_by_recompute(r.model, ids, 12))
    assert main(["classify", run, "KING"]) == 2
    assert "classify needs a" in capsys.readouterr().err
    assert main(["predict", run, "KING", "--set", "temperature=-1"]) == 2
    assert "temperature and top_k at least 0" in capsys.readouterr().err
