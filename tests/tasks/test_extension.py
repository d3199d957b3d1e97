"""A task written outside the package, registered there, with no edit to the package: which
bit is in the majority in a string of 0s and 1s, by an encoder. It trains from the CLI, resumes,
and `anyformer eval`, `predict` and `classify` serve its runs through the task protocol alone
(the shared sampler, classification base and held-out metrics of anyformer.tasks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyformer.cli import main
from anyformer.config import ModelConfig, save_yaml
from anyformer.data.sampler import SeededSampler
from anyformer.tasks import TASKS
from anyformer.tasks._classification import Classifier, held_out_metrics, predict
from anyformer.training.config import RunConfig, TaskConfig, TrainConfig

CLS = 2  # the token before the bits


@dataclass
class Bits:
    """Bit strings (CLS first) and whether 1 is in the majority, for both splits."""

    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    tokenizer: None = None


def bits(count: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 2, (count, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((count, 1), CLS), x], 1), (x.sum(1) * 2 > length).long()


class BitSampler(SeededSampler):
    def __init__(self, data: Bits, seed: int) -> None:
        super().__init__(len(data.train), seed)
        self.data = data

    def example(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.data.train[index], self.data.train_labels[index]


class MajorityBit(Classifier):
    """Is 1 the majority bit of an odd-length string (train.seq_len - 1 bits)?"""

    architectures = ("encoder",)
    has_tokenizer = False
    use_command = "anyformer classify RUN BITS"
    predict_input = "a string of 0s and 1s, train.seq_len - 1 of them"

    def prepare(self, env: Any) -> Bits:
        n = self.cfg.train.seq_len - 1
        return Bits(*bits(512, n, 0), *bits(128, n, 1))

    def model_config(self, model: ModelConfig, data: Bits) -> ModelConfig:
        return dataclasses.replace(model, vocab_size=3, head=dataclasses.replace(model.head, kind="sequence_classification", num_labels=2))

    def sampler(self, data: Bits, seed: int) -> BitSampler:
        return BitSampler(data, seed)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y)

    def evaluate(self, model: nn.Module, data: Bits, env: Any, batches: int | None = None) -> dict[str, float]:
        loss, preds = predict(model, lambda idx: data.val[idx].to(env.device), data.val_labels, env, self.cfg.train.dtype, 64)
        return held_out_metrics(loss, preds, data.val_labels, data.train_labels, env, None)

    def class_names(self) -> list[str]:
        return ["zeros", "ones"]

    def read_input(self, text: str, tokenizer: Any, settings: dict[str, Any]) -> Tensor:
        n = self.cfg.train.seq_len - 1
        if len(text) != n or set(text) - {"0", "1"}:
            raise ValueError(f"give {n} characters, each 0 or 1; got {text!r}")
        return torch.tensor([[CLS, *map(int, text)]])


if "test_majority_bit" not in TASKS:
    TASKS.register("test_majority_bit")(MajorityBit)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bits")
    cfg = RunConfig(
        model=ModelConfig(arch="encoder", dim=32, num_layers=2, max_seq_len=16, attention={"num_heads": 4}, ffn={"hidden_dim": 64},
                          positional={"kind": "learned"}),
        train=TrainConfig(batch_size=32, seq_len=16, max_steps=60, max_minutes=None, warmup_steps=5, lr=3e-3, optimizer="adamw",
                          dtype="float32", eval_every=30, eval_batches=2, log_every=10, samples=0, threads=1),
        task=TaskConfig(kind="test_majority_bit"),
    )
    save_yaml(cfg, tmp / "bits.yaml")
    assert main(["train", str(tmp / "bits.yaml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_the_task_trains_and_evaluates_from_the_cli(run: Path, capsys) -> None:
    assert not (run / "tokenizer.json").exists()  # has_tokenizer = False
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    accuracy = float(next(line.split()[1] for line in out.splitlines() if line.startswith("accuracy")))
    majority = float(next(line.split()[1] for line in out.splitlines() if line.startswith("majority_accuracy")))
    assert "task test_majority_bit" in out and accuracy > majority + 0.1, out  # it learned something


def test_predict_and_classify_serve_its_runs(run: Path, capsys) -> None:
    assert main(["predict", str(run), "111111111100000"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {r[0] for r in rows} == {"zeros", "ones"} and sum(float(r[1]) for r in rows) == pytest.approx(1, abs=2e-3)
    assert main(["classify", str(run), "000000000011111", "--top", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["predict", str(run), "0101"]) == 2
    assert "give 15 characters, each 0 or 1" in capsys.readouterr().err
    assert main(["generate", str(run)]) == 2
    assert "writes no text" in capsys.readouterr().err
