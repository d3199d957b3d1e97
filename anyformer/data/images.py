"""Labelled image sets: Fashion-MNIST (the IDX files of Debian's `dataset-fashion-mnist`, or
any folder holding the four IDX files) and scikit-learn's 8x8 handwritten digits.

Images come back as uint8 tensors (n, H, W) in 0..255, ink bright on a dark background, with
int64 labels and the class names.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class LabelledImages:
    """One split of an image set."""

    images: Tensor  # (n, H, W) uint8
    labels: Tensor  # (n,) int64


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped when the name ends in .gz) as an array."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {raw[:4].hex()})")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values; its header promises shape {shape}")
    return data.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}(.gz)")


def fashion_mnist(path: str | None = None) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """The 60,000 training and 10,000 test images of Fashion-MNIST, and the class names."""
    folder = Path(path or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST is not at {folder}: install it with `sudo apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu), or set data.path to a folder holding train-images-idx3-ubyte(.gz), "
            "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
        )
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not pair up")
        splits.append(LabelledImages(torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1], list(FASHION_MNIST_CLASSES)


def digits() -> tuple[LabelledImages, list[str]]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16 scaled to 0..255) and their names."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8))
    return LabelledImages(images, torch.from_numpy(d.target.astype(np.int64))), [str(i) for i in range(10)]
