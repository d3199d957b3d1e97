"""Task audio_classification (anyformer/tasks/audio_classification.py) with the AST: trains on a
folder of labelled clips (spoken by espeak-ng here), `anyformer eval` reports the test speakers'
accuracy beside the majority class and a logistic regression, `classify` / `predict` read any
audio file (stereo, another sample rate, longer than the model's frames: said and handled), and
bad files give one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from anyformer.cli import main
from anyformer.config import apply_overrides
from anyformer.tasks.audio_classification import fit_frames
from anyformer.training import Trainer
from anyformer.training.config import default_run_config

sf = pytest.importorskip("soundfile", reason="audio files are read with soundfile (pip install soundfile)")
pytest.importorskip("scipy", reason="clips are resampled with scipy")


def test_fit_frames_keeps_the_loudest_window_and_pads_with_silence() -> None:
    spec = np.zeros((300, 4), dtype=np.float32)
    spec[150:200] = 5.0  # the word, in the middle of a long clip
    cut = fit_frames(spec, 100)
    assert cut.shape == (100, 4) and (cut > 1).sum(0).tolist() == [50] * 4  # the whole loud part is kept
    short = fit_frames(spec[140:210], 100)
    assert short.shape == (100, 4) and np.all(short[70:] == 0)  # padded after the clip, with its (standardised) mean


def audio_config(tmp: Path, *extra: str):  # type: ignore[no-untyped-def]
    """A tiny Audio Spectrogram Transformer run on spoken keywords synthesized into `tmp`
    (skipped without espeak-ng)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from anyformer.data.audio import synthesize_keywords

    synthesize_keywords(tmp / "clips", words=("yes", "no", "stop"), pitches=(50,), speeds=(160,))
    for clip in (tmp / "clips").glob("*/*.wav"):  # speaker = the accent: the name before the first '_'
        clip.rename(clip.with_name(clip.name.replace("+", "_")))
    return apply_overrides(default_run_config(), [
        "--task.kind=audio_classification", "--task.options.test_fraction=0.3", "--data.corpus=folder", f"--data.path={tmp / 'clips'}",
        "--data.val_fraction=0.3", f"--data.cache_dir={tmp / 'cache'}", "--model.arch=ast", "--model.options.mel_bins=32",
        "--model.options.frames=60", "--model.options.patch_size=8", "--model.options.frequency_stride=8", "--model.options.time_stride=8",
        "--model.max_seq_len=30", "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64",
        "--model.positional.kind=learned", "--train.batch_size=16", "--train.max_steps=30", "--train.max_minutes=null",
        "--train.warmup_steps=3", "--train.eval_every=15", "--train.log_every=5", "--train.dtype=float32", "--train.optimizer=adamw",
        "--train.lr=3e-3", "--train.samples=0", "--train.threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("audio")
    cfg = audio_config(tmp)
    Trainer(cfg, run_dir=tmp / "run", verbose=False).fit()
    return tmp / "run"


def test_eval_reports_test_speakers_beside_the_baselines(run: Path, capsys) -> None:
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("accuracy", "test_accuracy", "test_majority_accuracy", "test_logistic_regression_accuracy"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert (run / "confusion_test.png").is_file()


def test_classify_reads_any_audio_file(run: Path, tmp_path: Path, capsys) -> None:
    word = next((run.parent / "clips" / "yes").glob("*.wav"))
    wave, rate = sf.read(word, dtype="float32")
    assert main(["classify", str(run), str(word)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {r[0] for r in rows} == {"yes", "no", "stop"} and sum(float(r[1]) for r in rows) == pytest.approx(1, abs=2e-3)
    long = np.concatenate([np.zeros(rate * 2, dtype=np.float32), wave, np.zeros(rate, dtype=np.float32)])
    sf.write(tmp_path / "long_stereo.wav", np.stack([long, long], 1), 8000)
    assert main(["predict", str(run), str(tmp_path / "long_stereo.wav")]) == 0
    err = capsys.readouterr().err
    assert "mixed 2 channels down to one" in err and "resampled from 8000 Hz to 16000 Hz" in err and "cut to the loudest 60" in err
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    (tmp_path / "notes.wav").write_text("not audio")
    for name, message in [("empty.wav", "holds no samples"), ("notes.wav", "not an audio file"), ("missing.wav", "no audio file")]:
        assert main(["classify", str(run), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
