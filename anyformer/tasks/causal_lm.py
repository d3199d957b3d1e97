"""Causal language modelling: next-token prediction on a text corpus (the default task)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, parse_options
from ..data import TokenData, WindowSampler, prepare_tokens
from ..distributed import DistEnv, mean_across
from ..dtypes import DTYPES
from ..generation import GenerationConfig, generate
from ..generation.window import window_steps
from .base import TASKS, SampleOptions, Setting, Task

EVAL_SEED = 20240601


def lm_loss(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Mean next-token cross-entropy (nats/token) of inputs x (b, n) against targets y (b, n);
    the forward runs under autocast when `dtype` is lower precision, the loss in fp32."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x)  # (b, n, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, cfg: Any, env: DistEnv, batches: int | None = None) -> float:
    """Mean validation loss over `batches` x `cfg.batch_size` fixed random windows of
    `cfg.seq_len` tokens (the same windows at every call), split across processes; `cfg` is
    the run's TrainConfig."""
    sampler = WindowSampler(tokens, cfg.seq_len, seed=EVAL_SEED)
    was_training = model.training
    model.eval()
    dtype = DTYPES[cfg.dtype]
    total = torch.zeros((), device=env.device)
    n = batches or cfg.eval_batches
    per = cfg.batch_size // env.world
    for _ in range(n):
        starts = sampler.starts(cfg.batch_size)[env.rank * per : (env.rank + 1) * per]
        x, y = (t.to(env.device) for t in sampler.windows(starts))
        total += lm_loss(model, x, y, dtype)
    model.train(was_training)
    return float(mean_across(total / n, env))


@TASKS.register("causal_lm")
class CausalLM(Task):
    """Next-token prediction over random windows of `data.corpus`; metric: validation loss
    (nats/token)."""

    architectures = ("decoder", "megabyte")
    options_class = SampleOptions
    training_options = frozenset({"sample_prompt", "sample_tokens", "temperature", "top_k"})  # the end-of-run samples
    reads_any_length = True
    loss_unit = "nats/token"
    use_command = 'anyformer generate RUN --prompt "ROMEO:"'
    generates = "next_token"
    predict_input = "a prompt to continue"
    predict_settings = {"max_new_tokens": Setting(int, 200, "tokens to add"),
                        "temperature": Setting(float, 0.8, "sampling temperature (0: greedy)"),
                        "top_k": Setting(int, 0, "sample among the k most likely tokens (0: all)"),
                        "seed": Setting(int, None, "random seed of the sampling")}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = parse_options(SampleOptions, cfg.task.options, "task.options (causal_lm)")
        self.options.check_samples()

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        cls(cfg)  # the task options

    def sample_tokens(self) -> int:
        return self.options.sample_tokens

    def prepare(self, env: Any) -> TokenData:
        d = self.cfg.data
        return prepare_tokens(d.corpus, path=d.path, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                              cache_dir=d.cache_dir)

    def describe(self, data: TokenData) -> str:
        return f"data {len(data.train):,} train / {len(data.val):,} val tokens ({'cached' if data.cached else 'tokenized'} in {data.folder})"

    def model_config(self, model: ModelConfig, data: TokenData) -> ModelConfig:
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)

    def sampler(self, data: TokenData, seed: int) -> WindowSampler:
        return WindowSampler(data.train, self.cfg.train.seq_len, seed=seed)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        x, y = batch
        return lm_loss(model, x, y, dtype)

    def evaluate(self, model: nn.Module, data: TokenData, env: Any, batches: int | None = None) -> dict[str, float]:
        return {"val_loss": evaluate(model, data.val, self.cfg.train, env, batches=batches)}

    def eval_lines(self, model: nn.Module, data: TokenData, env: Any, *, batches: int, folder: Path) -> list[tuple[str, str]]:
        """Loss, perplexity and bits per character on fixed held-out windows of train.seq_len."""
        t = self.cfg.train
        if len(data.val) < t.seq_len + 2:
            raise ValueError(f"the held-out split has {len(data.val):,} tokens, fewer than one window of {t.seq_len} (--seq-len)")
        loss = evaluate(model, data.val, t, env, batches=batches)
        shown = min(len(data.val), 200_000)
        chars_per_token = len(data.tokenizer.decode(data.val[:shown].astype("int64").tolist())) / shown
        bpc = loss / math.log(2) / chars_per_token
        return [
            ("validation", f"{batches * t.batch_size * t.seq_len:,} tokens in windows of {t.seq_len} from held-out documents: "
                           f"{', '.join(data.val_names)}"),
            ("loss", f"{loss:.4f} nats/token"),
            ("perplexity", f"{math.exp(loss):.3f} (per token)"),
            ("bits/char", f"{bpc:.4f} ({chars_per_token:.3f} characters per token)"),
        ]

    def samples(self, model: nn.Module, data: TokenData) -> list[str]:
        """`train.samples` continuations of `task.options.sample_prompt` (`continuations`)."""
        t, o = self.cfg.train, self.options
        if not t.samples:
            return []
        config = GenerationConfig(max_new_tokens=o.sample_tokens, do_sample=o.temperature > 0, temperature=o.temperature,
                                  top_k=o.top_k or 0, seed=t.seed)
        return continuations(model, data.tokenizer, [o.sample_prompt] * t.samples, config)

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """Each prompt followed by its continuation (`anyformer generate` streams one instead)."""
        if settings["max_new_tokens"] < 1 or settings["temperature"] < 0 or settings["top_k"] < 0:
            raise ValueError(f"max_new_tokens must be at least 1, temperature and top_k at least 0; got {settings['max_new_tokens']}, "
                             f"{settings['temperature']} and {settings['top_k']}")
        if not all(inputs):
            raise ValueError("a prompt is empty; give at least one character to continue")
        config = GenerationConfig(max_new_tokens=settings["max_new_tokens"], do_sample=settings["temperature"] > 0,
                                  temperature=settings["temperature"], top_k=settings["top_k"], seed=settings["seed"])
        for prompt in inputs:
            if len(inputs) > 1:
                yield f"== {prompt}"
            yield continuations(model, tokenizer, [prompt], config)[0]


def continuations(model: nn.Module, tokenizer: Any, prompts: list[str], config: GenerationConfig) -> list[str]:
    """Each prompt followed by its continuation, decoded with the KV cache (a rolling sink +
    window cache past the context when the positions are relative; past the context with
    absolute positions, the last max_seq_len tokens are recomputed per step), through
    anyformer.generation's logit processing. The prompts must encode to the same length."""
    try:
        rows = [tokenizer.encode(p) for p in prompts]
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded by this run's tokenizer: {e}") from None
    context, steps = model.config.max_seq_len, config.max_new_tokens  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    if len(rows[0]) + steps > context and model.decoding_info().absolute_positions:  # type: ignore[operator]
        new = torch.stack(list(window_steps(model, rows, config, context=context)), dim=1)  # (prompts, steps)
    else:
        window = context - 4 if len(rows[0]) + steps > context else None
        new = generate(model, rows, config, window=window)[:, len(rows[0]):]
    model.train(was_training)
    return [p + tokenizer.decode(row.tolist()) for p, row in zip(prompts, new)]
