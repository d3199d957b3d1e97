"""Audio classification with the Audio Spectrogram Transformer (model.arch=ast).

Data (`data.corpus`): `keywords`, twenty spoken words synthesized with espeak-ng in 77 voices
(7 English accents x 11 speaker variants) at `pitches` and `speeds` (anyformer/data/audio.py);
or `folder`, the folder at `data.path` with one sub-folder of .wav / .flac files per label (a
file's speaker is its name before the first '_'). Splits are by speaker: `test_fraction` of the
speakers form the test set, `data.val_fraction` of the rest the held-out set that picks the best
checkpoint, so no evaluated voice is heard in training.

Features: each clip read at `sample_rate` (mixed down to mono, resampled), its log-mel
spectrogram (`model.options.mel_bins` bins, 25 ms frames every 10 ms), standardised per clip,
then cut or padded to `model.options.frames` frames: a longer clip keeps its loudest window of
that length, a shorter one is padded with silence (zeros, the clip's mean after
standardisation). Metrics: loss and accuracy beside the majority class; `anyformer eval` adds
the test set's accuracy, a logistic regression on each clip's mean log-mel frame (scikit-learn)
as a baseline, and the confusion matrix.

Task options: sample_rate (16000), test_fraction (0.15), pitches ([35, 65]), speeds ([130,
190]), shift (10: training clips move by up to this many frames).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.audio import KEYWORDS, Clip, folder_clips, log_mel, read_audio, speaker_split, synthesize_keywords
from ..data.sampler import SeededSampler
from ._classification import Classifier, held_out_metrics, predict
from .base import TASKS
from .image_classification import plot_confusion

CORPORA = ("keywords", "folder")
N_FFT, HOP = 400, 160  # 25 ms windows every 10 ms at 16 kHz


@dataclass
class AudioOptions:
    """Options of task 'audio_classification' (see the module doc)."""

    sample_rate: int = 16000
    test_fraction: float = 0.15
    pitches: list[int] = field(default_factory=lambda: [35, 65])
    speeds: list[int] = field(default_factory=lambda: [130, 190])
    shift: int = 10


@dataclass
class Spectrograms:
    """Standardised spectrograms (N, T, F) and labels (N,) of one split."""

    features: Tensor
    labels: Tensor


@dataclass
class AudioData:
    """The three splits, the label names and where the clips come from."""

    train: Spectrograms
    val: Spectrograms
    test: Spectrograms
    classes: list[str]
    source: str
    tokenizer: None = None


def fit_frames(spec: np.ndarray, frames: int) -> np.ndarray:
    """(T, F) standardised per clip, cut to its loudest window of `frames` frames or padded with
    zeros (its mean) to that length."""
    spec = (spec - spec.mean()) / (spec.std() + 1e-5)
    if len(spec) > frames:
        energy = np.convolve(spec.mean(1), np.ones(frames), mode="valid")  # (T - frames + 1,)
        start = int(energy.argmax())
        return spec[start : start + frames]
    return np.pad(spec, ((0, frames - len(spec)), (0, 0)))


class ClipSampler(SeededSampler):
    """Random training spectrograms, each shifted in time by its own seed (zeros fill in)."""

    def __init__(self, split: Spectrograms, shift: int, seed: int) -> None:
        super().__init__(len(split.labels), seed, empty="no training clips; give more speakers or lower the held-out fractions")
        self.split, self.shift = split, shift

    def example(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        spec = self.split.features[index]  # (T, F)
        s = int(torch.randint(-self.shift, self.shift + 1, (1,), generator=generator)) if self.shift else 0
        if s:
            spec = torch.roll(spec, s, 0)  # (T, F), frames moved by s; the frames that wrapped around become silence
            if s > 0:
                spec[:s] = 0
            else:
                spec[s:] = 0
        return spec, self.split.labels[index]


@TASKS.register("audio_classification")
class AudioClassification(Classifier):
    """Spoken-word (or any labelled audio) classification with an AST, split by speaker."""

    architectures = ("ast",)
    options_class = AudioOptions
    has_tokenizer = False
    reads_seq_len = False
    use_command = "anyformer classify RUN CLIP.wav"
    predict_input = "an audio file (.wav, .flac, ...; mixed down to mono, resampled, cut or padded to the model's frames)"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options = parse_options(AudioOptions, cfg.task.options, "task.options (audio_classification)")
        if o.sample_rate < 8000 or not 0 < o.test_fraction < 1 or o.shift < 0 or not o.pitches or not o.speeds:
            raise ConfigError(f"task.options: sample_rate must be >= 8000, test_fraction in (0, 1), shift >= 0, pitches and speeds "
                              f"non-empty; got {o.sample_rate}, {o.test_fraction}, {o.shift}, {o.pitches}, {o.speeds}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.data.corpus not in CORPORA:
            raise ConfigError(f"task 'audio_classification' reads data.corpus {' or '.join(CORPORA)}; got {cfg.data.corpus!r}")
        if cfg.data.corpus == "folder" and not cfg.data.path:
            raise ConfigError("data.corpus=folder needs data.path: a folder with one sub-folder of audio files per label")
        cls(cfg)

    def class_names(self) -> list[str]:
        if self.cfg.data.corpus == "keywords":
            return list(KEYWORDS)
        return sorted({c.label for c in folder_clips(self.cfg.data.path)})

    def _clips(self) -> tuple[list[Clip], str, Path]:
        d, o = self.cfg.data, self.options
        from ..data.tokens import default_cache_dir

        cache = Path(d.cache_dir or default_cache_dir()).expanduser()
        if d.corpus == "keywords":
            folder = cache / "espeak-keywords"
            return synthesize_keywords(folder, pitches=tuple(o.pitches), speeds=tuple(o.speeds)), "espeak-ng keywords", cache
        return folder_clips(d.path), str(d.path), cache

    def _features(self, clips: list[Clip], cache: Path) -> np.ndarray:
        """(N, T, F) spectrograms of `clips`, cached by the clips' files and the settings."""
        o, m = self.options, self.cfg.model.arch_options
        key = hashlib.sha256(json.dumps([[str(c.path), c.path.stat().st_mtime_ns] for c in clips] +
                                        [o.sample_rate, m.mel_bins, m.frames, N_FFT, HOP]).encode()).hexdigest()[:16]
        path = cache / f"audio-features-{key}.npy"
        if path.is_file():
            return np.load(path)
        out = np.stack([fit_frames(log_mel(read_audio(c.path, o.sample_rate)[0], o.sample_rate, n_mels=m.mel_bins, n_fft=N_FFT, hop=HOP),
                                   m.frames) for c in clips]).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        return out

    def prepare(self, env: Any) -> AudioData:
        clips, source, cache = self._clips()
        classes = self.class_names()
        rest, test = speaker_split(clips, self.options.test_fraction)
        train, val = speaker_split(rest, self.cfg.data.val_fraction)
        features = self._features(clips, cache)
        where = {c.path: i for i, c in enumerate(clips)}
        index = {name: i for i, name in enumerate(classes)}

        def split(part: list[Clip]) -> Spectrograms:
            rows = [where[c.path] for c in part]
            return Spectrograms(torch.from_numpy(features[rows]), torch.tensor([index[c.label] for c in part]))

        return AudioData(split(train), split(val), split(test), classes, source)

    def describe(self, data: AudioData) -> str:
        m = self.cfg.model.arch_options
        return (f"data {data.source}: {len(data.train.labels):,} train / {len(data.val.labels):,} held-out / {len(data.test.labels):,} "
                f"test clips (speakers apart), {len(data.classes)} classes, {m.frames} frames x {m.mel_bins} mel bins")

    def model_config(self, model: ModelConfig, data: AudioData) -> ModelConfig:
        head = dataclasses.replace(model.head, kind="sequence_classification", num_labels=len(data.classes))
        return dataclasses.replace(model, head=head)

    def tokens_per_example(self) -> int:
        return self.cfg.model.arch_options.num_tokens

    def sampler(self, data: AudioData, seed: int) -> ClipSampler:
        return ClipSampler(data.train, self.options.shift, seed)

    def _predict(self, model: nn.Module, split: Spectrograms, env: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
        return predict(model, lambda part: split.features[part].to(env.device), split.labels, env, self.cfg.train.dtype,
                       max(self.cfg.train.batch_size, 64), limit)

    def evaluate(self, model: nn.Module, data: AudioData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss and accuracy on the held-out speakers' clips, beside the majority class."""
        loss, preds = self._predict(model, data.val, env)
        return held_out_metrics(loss, preds, data.val.labels, data.train.labels, env, None)

    def report(self, model: nn.Module, data: AudioData, env: Any, folder: Path) -> dict[str, Any]:
        """On the test speakers: loss, accuracy, the majority class's accuracy, a logistic
        regression on each clip's mean frame (fit on the training clips), the confusion PNG."""
        from sklearn.linear_model import LogisticRegression

        loss, preds = self._predict(model, data.test, env)
        labels, k = data.test.labels, len(data.classes)
        majority = int(torch.bincount(data.train.labels).argmax())
        regression = LogisticRegression(max_iter=2000).fit(data.train.features.mean(1).numpy(), data.train.labels.numpy())
        baseline = float((torch.from_numpy(regression.predict(data.test.features.mean(1).numpy())) == labels).float().mean())
        accuracy = float((preds == labels).float().mean())
        confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
        path = Path(folder) / "confusion_test.png"
        plot_confusion(confusion, data.classes, path, f"{data.source}, test speakers: accuracy {accuracy:.2%}")
        return {"test_loss": float(loss) / len(labels), "test_accuracy": accuracy, "test_clips": len(labels),
                "test_majority_accuracy": float((labels == majority).float().mean()),
                "test_logistic_regression_accuracy": baseline, "confusion_matrix": str(path)}

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        """An audio file as the model input (1, T, F); what was done to it goes to stderr."""
        o, m = self.options, self.cfg.model.arch_options
        wave, notes = read_audio(text, o.sample_rate)
        spec = log_mel(wave, o.sample_rate, n_mels=m.mel_bins, n_fft=N_FFT, hop=HOP)
        if len(spec) > m.frames:
            notes.append(f"{len(spec)} frames cut to the loudest {m.frames}")
        for note in notes:
            print(f"[{Path(text).name}: {note}]", file=sys.stderr)
        return torch.from_numpy(fit_frames(spec, m.frames))[None]
