"""anyformer/data/audio.py: log-mel spectrograms against librosa's, the mel scale's known values,
reading (mix-down, resampling, bad files), the split by speaker, and keyword synthesis."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from anyformer.data.audio import Clip, folder_clips, hz_to_mel, log_mel, mel_to_hz, read_audio, speaker_split, synthesize_keywords

sf = pytest.importorskip("soundfile", reason="audio files are read with soundfile (pip install soundfile)")


def test_mel_scale_known_values() -> None:
    # Slaney: 1000 Hz is 15 mels; linear below (200/3 Hz per mel); 6400 Hz is 15 + 27 mels
    assert hz_to_mel(np.array([0.0, 200.0, 1000.0, 6400.0])) == pytest.approx([0.0, 3.0, 15.0, 42.0])
    hz = np.array([50.0, 700.0, 1000.0, 3000.0, 8000.0])
    assert mel_to_hz(hz_to_mel(hz)) == pytest.approx(hz)


def test_log_mel_equals_librosa() -> None:
    librosa = pytest.importorskip("librosa", reason="the reference spectrogram comes from librosa")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wave = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(16000)).astype(np.float32)
    ours = log_mel(wave, 16000, n_mels=40, n_fft=400, hop=160)
    ref = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=400, hop_length=160, n_mels=40, center=True, pad_mode="constant",
                                         power=2.0, htk=False, norm="slaney")
    assert ours.shape == ref.T.shape
    assert np.allclose(ours, np.log(ref.T + 1e-6), atol=1e-3)


def test_read_audio_mixes_down_and_resamples(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    tone = np.sin(2 * np.pi * 500 * t).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([tone, 0 * tone], 1), 8000)
    wave, notes = read_audio(tmp_path / "stereo.wav", 16000)
    assert len(wave) == 16000 and notes == ["mixed 2 channels down to one", "resampled from 8000 Hz to 16000 Hz"]
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
    assert peak == pytest.approx(500, abs=2) and np.abs(wave).max() == pytest.approx(0.5, abs=0.02)  # the mean of the channels
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    (tmp_path / "notes.wav").write_text("not audio")
    for name, message in [("empty.wav", "holds no samples"), ("notes.wav", "not an audio file"), ("missing.wav", "no audio file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            read_audio(tmp_path / name, 16000)


def test_split_by_speaker_holds_whole_speakers_apart(tmp_path: Path) -> None:
    clips = [Clip(tmp_path / f"{s}_{i}.wav", w, s) for s in "abcdefghij" for i, w in enumerate(["yes", "no"])]
    kept, held = speaker_split(clips, 0.3)
    assert len({c.speaker for c in held}) == 3 and not {c.speaker for c in held} & {c.speaker for c in kept}
    assert len(kept) + len(held) == len(clips)
    with pytest.raises(ValueError, match="needs at least two"):
        speaker_split([clips[0]], 0.5)


def test_folder_clips_label_by_folder(tmp_path: Path) -> None:
    for label in ("yes", "no"):
        (tmp_path / label).mkdir()
        for speaker in ("ann", "bob"):
            sf.write(tmp_path / label / f"{speaker}_1.wav", np.zeros(100, dtype=np.float32), 16000)
    clips = folder_clips(tmp_path)
    assert sorted((c.label, c.speaker) for c in clips) == [("no", "ann"), ("no", "bob"), ("yes", "ann"), ("yes", "bob")]
    with pytest.raises(ValueError, match="at least two folders"):
        folder_clips(tmp_path / "yes")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_synthesized_keywords_are_speech_of_every_voice(tmp_path: Path) -> None:
    clips = synthesize_keywords(tmp_path, words=("yes", "seven"), pitches=(50,), speeds=(160,))
    assert len(clips) == 2 * 77 and {c.label for c in clips} == {"yes", "seven"} and len({c.speaker for c in clips}) == 77
    wave, _ = read_audio(clips[0].path, 16000)
    assert 0.1 < len(wave) / 16000 < 2.0 and np.abs(wave).max() > 0.05  # a short, audible word
    again = synthesize_keywords(tmp_path, words=("yes", "seven"), pitches=(50,), speeds=(160,))
    assert [c.path.stat().st_mtime for c in again] == [c.path.stat().st_mtime for c in clips]  # made once
