"""The task protocol the trainer drives, and the registry of tasks.

A task is built from the run config (`Task(cfg)`), checks that the architecture fits it,
prepares its data (an object with a `tokenizer` saved beside the run), gives the model config
its vocabulary and head, draws training batches through a sampler whose state resumes exactly,
computes the loss of a batch, and evaluates (a dict of metrics holding `val_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..distributed import DistEnv
from ..registry import Registry

RunConfig = Any  # anyformer.training.config.RunConfig (a layer above: training imports tasks)

TASKS: Registry[type["Task"]] = Registry("task")


def token_input(ids: list[int], tokenizer: Any, limit: int) -> tuple[Tensor, list[str] | None]:
    """(1, n) ids as a model input, and a printable label per token when there are at most 24
    (ids outside the text vocabulary, a task's special tokens, show as <id>)."""
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens; this model reads at most {limit}")
    labels = None
    if len(ids) <= 24:
        labels = []
        for i in ids:
            try:
                labels.append(repr(tokenizer.decode([i]))[1:-1] or "·")
            except Exception:  # an id outside the text vocabulary
                labels.append(f"<{i}>")
    return torch.tensor([ids]), labels


@dataclass
class SampleOptions:
    """Task options of a task that writes text: the `train.samples` texts shown at the end of a
    run continue `sample_prompt` by `sample_tokens` tokens, sampled at `temperature` (0:
    greedy) among the `top_k` most likely tokens (null: all)."""

    sample_prompt: str = "\n"
    sample_tokens: int = 300
    temperature: float = 0.8
    top_k: int | None = None

    def check_samples(self) -> None:
        """Raise ConfigError when the sampling settings cannot be used."""
        if self.sample_tokens < 1 or not 0 <= self.temperature < float("inf") or (self.top_k is not None and self.top_k < 0):
            raise ConfigError(f"task.options.sample_tokens must be >= 1, task.options.temperature >= 0 (0 = greedy) and "
                              f"task.options.top_k >= 0 or null; got {self.sample_tokens}, {self.temperature}, {self.top_k}")


@dataclass(frozen=True)
class Setting:
    """One setting of a task's predictions (`anyformer predict RUN INPUT --set NAME=VALUE`)."""

    type: type
    default: Any
    help: str

    def parse(self, name: str, text: str) -> Any:
        """The value of `NAME=text`, converted to the setting's type; a clear error otherwise."""
        if self.type is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"setting {name} takes true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(f"setting {name} takes {'an integer' if self.type is int else 'a number' if self.type is float else 'a text'}, "
                             f"got {text!r}") from None


class Sampler(Protocol):
    """Training batches in a resumable random order."""

    def draw(self, batch: int) -> Tensor:
        """(b,) indices of the next global batch (advancing the random state)."""

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        """The tensors of the examples at `indices` (a process's share of a draw)."""

    def state(self) -> Tensor:
        """The random state, for checkpoints."""

    def set_state(self, state: Tensor) -> None:
        """Restore a state from `state()`."""


class Task:
    """Base class of tasks; subclasses set `architectures` and implement the methods."""

    architectures: ClassVar[tuple[str, ...]] = ()
    options_class: ClassVar[type | None] = None  # the dataclass `task.options` is read into (None: the task takes none)
    reads_seq_len: ClassVar[bool] = True  # whether train.seq_len sizes the examples (not for images)
    reads_any_length: ClassVar[bool] = False  # whether `eval --seq-len` / `--lm-infinite` may read held-out data at another length
    has_tokenizer: ClassVar[bool] = True  # whether a run saves tokenizer.json (not for images or point clouds)
    loss_unit: ClassVar[str] = "nats/example"  # what one unit of the training and validation loss is
    #: the command that uses a run of this task, with RUN where the run folder goes (None: only `eval`)
    use_command: ClassVar[str | None] = None
    #: what one input of `anyformer predict RUN INPUT...` is ("a text", "an image file", ...); None: no predictions
    predict_input: ClassVar[str | None] = None
    #: the commands named for this task that serve its runs (`classify`, `translate`, `infill`, ...)
    commands: ClassVar[tuple[str, ...]] = ()
    #: how `anyformer generate` writes text from a run: token by token ("next_token"), by
    #: drafting blocks ("diffusion"), or not at all (None)
    generates: ClassVar[str | None] = None
    #: the settings of its predictions, by name (`predict --set NAME=VALUE`; the named command's flags)
    predict_settings: ClassVar[dict[str, Setting]] = {}
    #: the task options that change only how training examples are drawn (augmentation) or what
    #: the end-of-run samples show, never the held-out data or its scoring: the ones that
    #: `anyformer compare` variants may set differently
    training_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ConfigError when the run's architecture does not fit this task."""
        name = cfg.task.kind
        if cfg.model.arch not in cls.architectures:
            raise ConfigError(
                f"task '{name}' trains model.arch {' or '.join(repr(a) for a in cls.architectures)}; this run has "
                f"model.arch={cfg.model.arch!r}. Set model.arch, or pick the task that fits it"
            )

    def prepare(self, env: DistEnv) -> Any:
        """The task's data: an object with a `tokenizer` (saved as the run's tokenizer.json;
        None for data that is not text)."""
        raise NotImplementedError

    def describe(self, data: Any) -> str:
        """One line about the data, for the run's first message."""
        return ""

    def model_config(self, model: ModelConfig, data: Any) -> ModelConfig:
        """The model config with what the data decides (vocabulary size, head)."""
        raise NotImplementedError

    def sampler(self, data: Any, seed: int) -> Sampler:
        """The training sampler."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        """The mean loss of one (part of a) batch, forward under autocast to `dtype`."""
        raise NotImplementedError

    def sample_tokens(self) -> int:
        """Tokens written per end-of-run sample (what the time budget keeps for them); 0 by default."""
        return 0

    def tokens_per_example(self) -> int:
        """The sequence length one training example feeds the model (for throughput and FLOPs)."""
        return int(self.cfg.train.seq_len)

    def count(self, batch: tuple[Tensor, ...]) -> Tensor | None:
        """The number of predictions in a batch when it varies between batches (the loss is
        then weighted by it); None when every example weighs the same."""
        return None

    def evaluate(self, model: nn.Module, data: Any, env: DistEnv, batches: int | None = None) -> dict[str, float]:
        """Validation metrics on fixed held-out batches; `val_loss` is the one checkpoints rank by."""
        raise NotImplementedError

    def samples(self, model: nn.Module, data: Any) -> list[str]:
        """Texts to show at the end of a run (none by default)."""
        return []

    def report(self, model: nn.Module, data: Any, env: DistEnv, folder: Path) -> dict[str, Any]:
        """What `anyformer eval` adds to the validation metrics: test-set figures and files it
        writes into `folder` (e.g. a confusion matrix); nothing by default."""
        return {}

    def eval_lines(self, model: nn.Module, data: Any, env: DistEnv, *, batches: int, folder: Path) -> list[tuple[str, str]]:
        """What `anyformer eval` prints under the run's name, as (label, text) rows: by default
        the held-out data, every metric of `evaluate`, then those of `report`."""
        rows = [("validation", f"the held-out split ({self.describe(data)})")]
        for name, value in {**self.evaluate(model, data, env, batches=batches), **self.report(model, data, env, folder)}.items():
            rows.append((name, f"{value:.4f}" if isinstance(value, float) else str(value)))
        return rows

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        """What `anyformer inspect attention` feeds the model for `text` (the --prompt, or the
        path given as --image): a batch of one, and a label per token when the input is short
        text (None otherwise). By default the text's tokens."""
        if tokenizer is None:
            raise ValueError(f"task {self.cfg.task.kind!r} reads no text; give the file it reads with --image")
        return token_input(tokenizer.encode(text), tokenizer, self.cfg.model.max_seq_len)

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """The lines that answer each user input (`predict_input`), with `settings` holding a
        value for every name of `predict_settings`; bad inputs raise ValueError saying what to give."""
        raise NotImplementedError

    @classmethod
    def next_commands(cls, run_dir: Path) -> str:
        """The commands that use a finished run, for the end of `anyformer train`."""
        use = f" | {cls.use_command.replace('RUN', str(run_dir))}" if cls.use_command else ""
        return f"anyformer eval {run_dir}{use}"
