"""Point-cloud classification with the point-cloud Transformer (model.arch=point_cloud).

Data (`data.corpus`): `shapes`, procedural clouds from trimesh's primitives (ten classes, see
anyformer/data/point_clouds.py): `shapes_per_class` training, `val_per_class` held-out (it picks
the best checkpoint) and `test_per_class` test clouds per class, each from its own seed (from
`data_seed`), randomly scaled per axis (`anisotropy`), rotated (`rotate`) and jittered
(`noise`). Or `folder`: the folder at `data.path`, one subfolder of mesh or point files per
class; files under a `test/` folder are the test set, the others are split by a hash of their
path (`data.val_fraction`). Every cloud has `model.options.num_points` points, centred and
scaled into the unit sphere.

Training augmentation (`augment`): each drawn cloud is distorted again with its own seed: a new
per-axis scale, a new random rotation when `rotate` is set, renormalised, new noise; a resumed
or data-parallel run sees the same clouds.

`anyformer eval` reports on the test set (the held-out split when there is none): accuracy, the
accuracy with each cloud's points shuffled (order robustness; equal by construction, up to
exact distance ties) and with every cloud turned by an extra random rotation (rotation
robustness), and a confusion-matrix PNG.

Task options: shapes_per_class (500), val_per_class (50), test_per_class (100), data_seed (0),
rotate (true), anisotropy (0.2), noise (0.01), augment (true).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.point_clouds import (SHAPES, LabelledClouds, ShapeSettings, distort, folder_classes, folder_clouds,
                                 procedural_clouds, read_cloud, rotate_clouds, shuffle_points)
from ..data.sampler import SeededSampler
from ._classification import Classifier, held_out_metrics, predict
from .base import TASKS
from .image_classification import plot_confusion

CORPORA = ("shapes", "folder")


@dataclass
class PointCloudOptions:
    """Options of task 'point_cloud_classification'."""

    shapes_per_class: int = 500
    val_per_class: int = 50
    test_per_class: int = 100
    data_seed: int = 0
    rotate: bool = True
    anisotropy: float = 0.2
    noise: float = 0.01
    augment: bool = True


@dataclass
class PointCloudData:
    """Training, held-out and (when there is one) test clouds with the class names."""

    train: LabelledClouds
    val: LabelledClouds
    test: LabelledClouds | None
    classes: list[str]
    source: str
    tokenizer: None = None  # clouds need none

    @property
    def num_points(self) -> int:
        return int(self.train.points.shape[1])


class CloudSampler(SeededSampler):
    """Random training clouds, each distorted again with its own seed (task.options.augment)."""

    def __init__(self, split: LabelledClouds, options: PointCloudOptions, seed: int) -> None:
        super().__init__(len(split), seed, empty="no training clouds; give more shapes or files")
        self.split, self.options = split, options

    def example(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        o, points = self.options, self.split.points[index]
        if o.augment:
            points = distort(points, generator, rotate=o.rotate, anisotropy=o.anisotropy, noise=o.noise)
        return points, self.split.labels[index]


@TASKS.register("point_cloud_classification")
class PointCloudClassification(Classifier):
    """The class of a 3-D point cloud, with the point-cloud Transformer."""

    architectures = ("point_cloud",)
    has_tokenizer = False
    use_command = 'anyformer classify RUN CLOUD.xyz'
    predict_input = "a point file (.xyz, .npy) or a mesh file (.obj, .stl, .ply, .off, ...)"
    reads_seq_len = False
    training_options = frozenset({"augment"})  # rotate, anisotropy and noise also shape the held-out clouds

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options = parse_options(PointCloudOptions, cfg.task.options, "task.options (point_cloud_classification)")
        if min(o.shapes_per_class, o.val_per_class, o.test_per_class) < 1:
            raise ConfigError(
                f"task.options shapes_per_class, val_per_class and test_per_class must be at least 1 (got "
                f"{o.shapes_per_class}, {o.val_per_class}, {o.test_per_class})"
            )
        if not 0 <= o.anisotropy <= 1 or not 0 <= o.noise <= 0.2:
            raise ConfigError(f"task.options.anisotropy must be in [0, 1] and noise in [0, 0.2]; got {o.anisotropy} and {o.noise}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        cfg.model.validate()  # the point-cloud options and their fit with the rest of the model
        if cfg.model.head.kind not in ("none", "sequence_classification"):
            raise ConfigError(
                f"task 'point_cloud_classification' trains the class-token classifier (model.head.kind="
                f"sequence_classification); this run has model.head.kind={cfg.model.head.kind!r}"
            )
        if cfg.data.corpus not in CORPORA:
            raise ConfigError(
                f"task 'point_cloud_classification' reads data.corpus 'shapes' (procedural trimesh primitives) or 'folder' "
                f"(data.path: one subfolder of mesh or point files per class); got {cfg.data.corpus!r}"
            )
        if cfg.data.corpus == "folder" and cfg.data.path is None:
            raise ConfigError("data.corpus=folder reads the folder at data.path (one subfolder per class); set data.path")
        if cfg.data.corpus == "shapes" and cfg.data.path is not None:
            raise ConfigError("data.corpus=shapes generates its clouds; data.path does not apply (unset it, or use data.corpus=folder)")

    def need(self) -> int:
        """The fewest points per cloud the model's tokenization accepts."""
        p = self.cfg.model.arch_options
        return max(p.num_groups, p.group_size)

    def prepare(self, env: Any) -> PointCloudData:
        d, o, p = self.cfg.data, self.options, self.cfg.model.arch_options
        if d.corpus == "folder":
            sets, classes = folder_clouds(d.path, p.num_points, self.need(), d.val_fraction, d.cache_dir)
            return PointCloudData(sets["train"], sets["val"], sets.get("test"), classes, f"folder {d.path}")
        settings = ShapeSettings(num_points=p.num_points, rotate=o.rotate, anisotropy=o.anisotropy, noise=o.noise)
        counts = {"train": o.shapes_per_class, "val": o.val_per_class, "test": o.test_per_class}
        sets = procedural_clouds(counts, settings, o.data_seed, d.cache_dir)
        return PointCloudData(sets["train"], sets["val"], sets["test"], list(SHAPES), "shapes")

    def class_names(self) -> list[str]:
        """The names of the classes, in label order (without reading the clouds)."""
        return folder_classes(self.cfg.data.path) if self.cfg.data.corpus == "folder" else list(SHAPES)

    def describe(self, data: PointCloudData) -> str:
        test = f" / {len(data.test):,} test" if data.test is not None else ""
        rot = " | rotated" if self.options.rotate else ""
        aug = " | augmented" if self.options.augment else ""
        return (f"data {data.source}: {len(data.train):,} train / {len(data.val):,} held-out{test} clouds of "
                f"{data.num_points} points, {len(data.classes)} classes{rot}{aug}")

    def model_config(self, model: ModelConfig, data: PointCloudData) -> ModelConfig:
        if data.num_points != model.arch_options.num_points:
            raise ConfigError(f"the clouds have {data.num_points} points; set model.options.num_points={data.num_points}")
        head = dataclasses.replace(model.head, kind="sequence_classification", num_labels=len(data.classes))
        return dataclasses.replace(model, head=head)

    def tokens_per_example(self) -> int:
        return self.cfg.model.arch_options.num_groups + 1

    def sampler(self, data: PointCloudData, seed: int) -> CloudSampler:
        return CloudSampler(data.train, self.options, seed)

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        """The model input (1, P, 3) of a point or mesh file."""
        return read_cloud(text, self.cfg.model.arch_options.num_points, self.need())[None]

    def predict(self, model: nn.Module, points: Tensor, labels: Tensor, env: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """(summed loss, predicted class) of this process's share of the first `limit` clouds."""
        return predict(model, lambda part: points[part], labels, env, self.cfg.train.dtype, max(self.cfg.train.batch_size, 128), limit)

    def evaluate(self, model: nn.Module, data: PointCloudData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss and accuracy on the held-out clouds (the first `batches` x batch_size of them;
        all when `batches` is None), and the majority-class baseline's accuracy on them."""
        limit = None if batches is None else batches * self.cfg.train.batch_size
        loss, preds = self.predict(model, data.val.points, data.val.labels, env, limit)
        return held_out_metrics(loss, preds, data.val.labels, data.train.labels, env, limit)

    def report(self, model: nn.Module, data: PointCloudData, env: Any, folder: Path) -> dict[str, Any]:
        """On the test set (the held-out split when there is none): loss and accuracy; accuracy
        with each cloud's points shuffled and with each cloud turned by a random rotation
        (fixed seeds); the confusion matrix as a PNG in `folder`."""
        split, name = (data.test, "test") if data.test is not None else (data.val, "held-out")
        labels = split.labels
        loss, preds = self.predict(model, split.points, labels, env)
        _, shuffled = self.predict(model, shuffle_points(split.points, seed=1), labels, env)
        _, rotated = self.predict(model, rotate_clouds(split.points, seed=2), labels, env)
        accuracy = float((preds == labels).double().mean())
        k = len(data.classes)
        confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
        path = Path(folder) / f"confusion_{name}.png"
        plot_confusion(confusion, data.classes, path, f"{data.source} {name} set: accuracy {accuracy:.2%}")
        return {f"{name}_loss": float(loss) / len(labels), f"{name}_accuracy": accuracy,
                f"{name}_shuffled_accuracy": float((shuffled == labels).double().mean()),
                f"{name}_rotated_accuracy": float((rotated == labels).double().mean()),
                f"{name}_clouds": len(labels), "confusion_matrix": str(path)}
