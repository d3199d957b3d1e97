"""Image classification with a Vision Transformer: Fashion-MNIST (data.corpus=fashion_mnist) or
scikit-learn's 8x8 digits (data.corpus=digits).

The model's image size and channels come from the data; model.options.patch_size decides the
patches (it must divide the image size). Pixels map from 0..255 to [-1, 1]. The held-out split
is the share data.val_fraction of the training images with the lowest hashes of their index
(it picks the best checkpoint); Fashion-MNIST's own 10,000 test images are kept apart and only
`anyformer eval` reads them (test accuracy and the confusion matrix). Augmentation (optional):
random shifts of up to `shift` pixels, and random horizontal flips when `flip` is set.

Task options: augment (false), shift (2), flip (false).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.images import FASHION_MNIST_CLASSES, LabelledImages, digits, fashion_mnist
from ..data.sampler import SeededSampler
from ..data.split import held_out
from ._classification import Classifier, held_out_metrics, predict
from .base import TASKS, Setting

CORPORA = ("fashion_mnist", "digits")


@dataclass
class ImageClassificationOptions:
    """Options of task 'image_classification'."""

    augment: bool = False
    shift: int = 2
    flip: bool = False


@dataclass
class ImageData:
    """Training, held-out and (when the set has one) test images with the class names."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages | None
    classes: list[str]
    corpus: str
    tokenizer: None = None  # images need none

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def to_model_input(images: Tensor) -> Tensor:
    """uint8 images (b, H, W) in 0..255 -> float (b, 1, H, W) in [-1, 1]."""
    return (images.float() / 127.5 - 1.0).unsqueeze(1)


def read_image(path: str | Path, size: int, *, invert: bool = False, notes: list[str] | None = None) -> Tensor:
    """An image file as a uint8 (size, size) grayscale tensor. An image of another size is
    resized, keeping its aspect: a non-square one is first padded to a square with the colour
    of its border (its median edge pixel), so it is never squashed; what was done is appended
    to `notes`. A file Pillow cannot decode (not an image, truncated, corrupt) raises ValueError."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {str(path)!r}")
    try:
        with Image.open(path) as img:
            gray = img.convert("L")
            gray.load()
    except UnidentifiedImageError:
        raise ValueError(f"{str(path)!r} is not an image file Pillow can read (PNG, JPEG, BMP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a truncated or corrupt file
        raise ValueError(f"{str(path)!r} could not be decoded ({e}); the file may be truncated or corrupt") from None
    w, h = gray.size
    if (w, h) != (size, size):
        if w != h:
            pixels = np.array(gray, dtype=np.uint8)
            edge = int(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
            square = Image.new("L", (max(w, h), max(w, h)), edge)
            square.paste(gray, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            gray = square
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
        if notes is not None:
            padded = f", padded to a square with its border colour {edge} first" if w != h else ""
            notes.append(f"resized from {w} x {h} to the model's {size} x {size}{padded}")
    pixels = torch.from_numpy(np.array(gray, dtype=np.uint8))
    return 255 - pixels if invert else pixels


def augment(image: Tensor, shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """One (H, W) image shifted by up to `shift` pixels each way (zeros fill in), mirrored
    left-right with probability 1/2 when `flip` is set."""
    if shift > 0:
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        h, w = image.shape
        padded = F.pad(image, (shift, shift, shift, shift))
        image = padded[shift + dy : shift + dy + h, shift + dx : shift + dx + w]
    if flip and bool(torch.randint(0, 2, (1,), generator=generator)):
        image = image.flip(-1)
    return image


class ImageSampler(SeededSampler):
    """Random training images, each augmented with its own seed (task.options.augment)."""

    def __init__(self, split: LabelledImages, options: ImageClassificationOptions, seed: int) -> None:
        super().__init__(len(split.labels), seed, empty="no training images; change data.val_fraction")
        self.split, self.options = split, options

    def example(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        o, image = self.options, self.split.images[index]
        return augment(image, o.shift, o.flip, generator) if o.augment else image, self.split.labels[index]

    def collate(self, examples: list[tuple[Any, ...]]) -> tuple[Tensor, ...]:
        images, labels = super().collate(examples)
        return to_model_input(images), labels


def split_held_out(images: LabelledImages, corpus: str, fraction: float) -> tuple[LabelledImages, LabelledImages]:
    """(training, held-out): an image is held out when the hash of `corpus/index` is in the lowest `fraction`."""
    val = torch.tensor([held_out(f"{corpus}/{i}", fraction) for i in range(len(images.labels))], dtype=torch.bool)
    if not val.any() or val.all():
        raise ConfigError(f"data.val_fraction={fraction} leaves {int(val.sum())} of {len(val)} images held out; choose a fraction in (0, 1)")
    return (LabelledImages(images.images[~val], images.labels[~val]), LabelledImages(images.images[val], images.labels[val]))


@TASKS.register("image_classification")
class ImageClassification(Classifier):
    """The class of an image, with a Vision Transformer."""

    architectures = ("vit",)
    has_tokenizer = False
    use_command = 'anyformer classify RUN IMAGE.png'
    predict_input = "an image file (PNG, JPEG, ...; made grayscale and resized to the run's size)"
    predict_settings = {**Classifier.predict_settings, "invert": Setting(
        bool, False, "invert the gray levels first (the data sets have bright ink on black; use it for dark ink on white paper)")}
    reads_seq_len = False
    training_options = frozenset({"augment", "shift", "flip"})

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = parse_options(ImageClassificationOptions, cfg.task.options, "task.options (image_classification)")
        if not 0 <= self.options.shift <= 8:
            raise ConfigError(f"task.options.shift must be between 0 and 8 pixels, got {self.options.shift}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.model.head.kind not in ("none", "sequence_classification"):
            raise ConfigError(
                f"task 'image_classification' trains the class-token classifier (model.head.kind=sequence_classification); "
                f"this run has model.head.kind={cfg.model.head.kind!r}"
            )
        if cfg.data.corpus not in CORPORA:
            raise ConfigError(f"task 'image_classification' reads data.corpus {' or '.join(CORPORA)}; got {cfg.data.corpus!r}")

    def prepare(self, env: Any) -> ImageData:
        d = self.cfg.data
        if d.corpus == "digits":
            if d.path is not None:
                raise ConfigError("data.corpus=digits is scikit-learn's data set; data.path does not apply (unset it)")
            images, classes = digits()
            train, val = split_held_out(images, "digits", d.val_fraction)
            return ImageData(train, val, None, classes, d.corpus)
        train_all, test, classes = fashion_mnist(d.path)
        train, val = split_held_out(train_all, "fashion_mnist", d.val_fraction)
        return ImageData(train, val, test, classes, d.corpus)

    def class_names(self) -> list[str]:
        """The names of the classes, in label order (without loading the images)."""
        return list(FASHION_MNIST_CLASSES) if self.cfg.data.corpus == "fashion_mnist" else [str(i) for i in range(10)]

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        """An image file as the model input (1, 1, H, W), resized to the run's image size (keeping
        its aspect; said on stderr)."""
        notes: list[str] = []
        image = read_image(text, self.cfg.model.arch_options.image_size, invert=settings["invert"], notes=notes)
        for note in notes:
            print(f"[{Path(text).name}: {note}]", file=sys.stderr)
        return to_model_input(image[None])

    def describe(self, data: ImageData) -> str:
        test = f" / {len(data.test.labels):,} test" if data.test is not None else ""
        aug = " | augmented" if self.options.augment else ""
        return (f"data {data.corpus}: {len(data.train.labels):,} train / {len(data.val.labels):,} held-out{test} "
                f"images of {data.image_size}x{data.image_size}, {len(data.classes)} classes{aug}")

    def model_config(self, model: ModelConfig, data: ImageData) -> ModelConfig:
        size, v = data.image_size, model.arch_options
        if (v.image_size, v.channels) != (size, 1):
            divisors = [p for p in range(1, size + 1) if size % p == 0]
            raise ConfigError(
                f"{data.corpus} has {size}x{size} images of 1 channel; the model is configured for {v.image_size}x{v.image_size} "
                f"with {v.channels}: set model.options.image_size={size}, model.options.channels=1 "
                f"(model.options.patch_size one of {divisors}) and model.max_seq_len to at least the patches + 1"
            )
        head = dataclasses.replace(model.head, kind="sequence_classification", num_labels=len(data.classes))
        return dataclasses.replace(model, head=head)

    def tokens_per_example(self) -> int:
        return self.cfg.model.arch_options.num_patches + 1

    def sampler(self, data: ImageData, seed: int) -> ImageSampler:
        return ImageSampler(data.train, self.options, seed)

    def predict(self, model: nn.Module, split: LabelledImages, env: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """(summed loss, predicted class) of this process's share of the first `limit` images."""
        return predict(model, lambda part: to_model_input(split.images[part]), split.labels, env, self.cfg.train.dtype,
                       max(self.cfg.train.batch_size, 256), limit)

    def evaluate(self, model: nn.Module, data: ImageData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss and accuracy on the held-out images (the first `batches` x batch_size of them;
        all when `batches` is None), and the majority-class baseline's accuracy on them."""
        limit = None if batches is None else batches * self.cfg.train.batch_size
        loss, preds = self.predict(model, data.val, env, limit)
        return held_out_metrics(loss, preds, data.val.labels, data.train.labels, env, limit)

    def report(self, model: nn.Module, data: ImageData, env: Any, folder: Path) -> dict[str, Any]:
        """Test-set loss and accuracy (Fashion-MNIST; the held-out split for digits) and the
        confusion matrix of that set as a PNG in `folder`."""
        split, name = (data.test, "test") if data.test is not None else (data.val, "held-out")
        loss, preds = self.predict(model, split, env)
        labels = split.labels
        k = len(data.classes)
        confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
        path = Path(folder) / f"confusion_{name}.png"
        plot_confusion(confusion, data.classes, path, f"{data.corpus} {name} set: accuracy {float((preds == labels).float().mean()):.2%}")
        return {f"{name}_loss": float(loss) / len(labels), f"{name}_accuracy": float((preds == labels).float().mean()),
                f"{name}_images": len(labels), "confusion_matrix": str(path)}


def plot_confusion(confusion: Tensor, classes: list[str], path: Path, title: str) -> None:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k))
    shares = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
