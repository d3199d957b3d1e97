"""Audio for the audio tasks: spoken keywords synthesized with espeak-ng over many voices, any
folder of labelled .wav / .flac files, reading (mixed down to mono, resampled, both said), and
log-mel spectrograms.

Legend: `S` samples, `T` frames, `F` mel bins.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the keywords spoken (the Speech Commands set's twenty core words)
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: espeak-ng's English accents; a voice is an accent with one of its speaker variants
ACCENTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class Clip:
    """One labelled recording: its file, its label, and who speaks it (the voice, or the
    folder's speaker: what a split by speaker holds apart)."""

    path: Path
    label: str
    speaker: str


def voices() -> list[str]:
    """Every espeak-ng voice used: accent+variant."""
    return [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]


def espeak_path() -> str:
    """The espeak-ng program, or an error that says how to install it."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise FileNotFoundError("espeak-ng is not installed; it synthesizes the spoken keywords "
                                "(Debian/Ubuntu: apt-get install espeak-ng)")
    return found


def synthesize_keywords(folder: str | Path, *, words: tuple[str, ...] = KEYWORDS, pitches: tuple[int, ...] = (35, 65),
                        speeds: tuple[int, ...] = (130, 190)) -> list[Clip]:
    """Every word in every voice, pitch and speed as a .wav under `folder` (made once: files
    already there are kept), as clips labelled by word with the voice as speaker."""
    program, root = espeak_path(), Path(folder)
    clips = []
    for voice in voices():
        for pitch in pitches:
            for speed in speeds:
                for word in words:
                    path = root / word / f"{voice.replace('+', '_')}_p{pitch}_s{speed}.wav"
                    if not path.is_file():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_suffix(".tmp.wav")
                        subprocess.run([program, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(tmp), word],
                                       check=True, capture_output=True)
                        tmp.replace(path)  # a file is there whole or not at all
                    clips.append(Clip(path, word, voice))
    return clips


def folder_clips(folder: str | Path) -> list[Clip]:
    """Clips of a folder with one sub-folder of .wav / .flac files per label; a clip's speaker
    is the part of its file name before the first '_' (`alice_01.wav`), else the file itself."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {str(root)!r}; give a folder with one sub-folder of audio files per label")
    clips = [Clip(p, p.parent.name, p.stem.split("_")[0] if "_" in p.stem else p.stem)
             for p in sorted(root.glob("*/*")) if p.suffix.lower() in AUDIO_SUFFIXES]
    labels = {c.label for c in clips}
    if len(labels) < 2:
        raise ValueError(f"{root} holds {len(clips)} audio files in {len(labels)} label folder(s); give at least two folders of "
                         ".wav or .flac files")
    return clips


def speaker_split(clips: list[Clip], fraction: float) -> tuple[list[Clip], list[Clip]]:
    """(kept, held out): whole speakers are held out, those whose name hashes lowest, about
    `fraction` of them (at least one), so no held-out speaker is heard in the kept clips."""
    speakers = sorted({c.speaker for c in clips}, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    held = set(speakers[: max(1, round(fraction * len(speakers)))])
    if len(held) == len(speakers):
        raise ValueError(f"only {len(speakers)} speaker(s): a split by speaker needs at least two")
    return [c for c in clips if c.speaker not in held], [c for c in clips if c.speaker in held]


def read_audio(path: str | Path, sample_rate: int) -> tuple[np.ndarray, list[str]]:
    """A file's samples (S,) float32 in [-1, 1] at `sample_rate`, and what was done to it (mixed
    down from stereo, resampled); unreadable, empty or non-audio files raise ValueError."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no audio file at {str(p)!r}")
    try:
        samples, rate = sf.read(str(p), dtype="float32", always_2d=True)  # (S, channels)
    except (RuntimeError, sf.LibsndfileError) as e:  # type: ignore[attr-defined]
        raise ValueError(f"{p} is not an audio file soundfile can read (.wav, .flac, ...): {e}") from None
    notes = []
    if samples.shape[1] > 1:
        notes.append(f"mixed {samples.shape[1]} channels down to one")
    wave = samples.mean(1)
    if len(wave) == 0:
        raise ValueError(f"{p} holds no samples")
    if not np.isfinite(wave).all():
        raise ValueError(f"{p} holds samples that are NaN or infinite")
    if rate != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate, sample_rate)
        wave = resample_poly(wave, sample_rate // g, rate // g).astype(np.float32)
        notes.append(f"resampled from {rate} Hz to {sample_rate} Hz")
    return wave, notes


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz < 1000.0, hz / (200.0 / 3), log_part)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """The inverse of `hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * (200.0 / 3), 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)))


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(F, n_fft // 2 + 1) triangular filters evenly spaced on the mel scale, each scaled to unit
    area in Hz (Slaney's normalisation)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return (np.maximum(0, np.minimum(rising, falling)) * (2.0 / (upper - lower))).astype(np.float32)


def log_mel(wave: np.ndarray, sample_rate: int, *, n_mels: int = 64, n_fft: int = 400, hop: int = 160,
            eps: float = 1e-6) -> np.ndarray:
    """(T, F) natural-log mel power spectrogram: frames of `n_fft` samples under a periodic Hann
    window every `hop` samples, the signal zero-padded by n_fft // 2 on each side (frame t is
    centred on sample t * hop), power spectra through `mel_filters`, log(x + eps)."""
    pad = n_fft // 2
    padded = np.pad(np.asarray(wave, dtype=np.float32), (pad, pad))
    count = 1 + (len(padded) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]  # (T, n_fft)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2  # (T, n_fft // 2 + 1)
    return np.log(power @ mel_filters(sample_rate, n_fft, n_mels).T + eps).astype(np.float32)
