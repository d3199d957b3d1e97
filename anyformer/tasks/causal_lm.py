"""Causal language modelling: next-token prediction on a text corpus (the default task)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from ..data import TokenData, WindowSampler, prepare_tokens
from ..distributed import DistEnv, mean_across
from ..dtypes import DTYPES
from .base import TASKS, Task

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


class _Windows(WindowSampler):
    """Random windows of the training tokens, as a task sampler."""

    def draw(self, batch: int) -> Tensor:
        return self.starts(batch)

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        return self.windows(indices)


@TASKS.register("causal_lm")
class CausalLM(Task):
    """Next-token prediction over random windows of `data.corpus`; metric: validation loss
    (nats/token)."""

    architectures = ("decoder", "megabyte")
    reads_any_length = True
    loss_unit = "nats/token"
    use_command = 'anyformer generate RUN --prompt "ROMEO:"'

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.task.options:
            raise ConfigError(f"the causal LM task (task.kind=causal_lm) takes no task.options; got {', '.join(sorted(cfg.task.options))}")

    def prepare(self, env: Any) -> TokenData:
        d = self.cfg.data
        return prepare_tokens(d.corpus, path=d.path, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                              cache_dir=d.cache_dir)

    def describe(self, data: TokenData) -> str:
        return f"data {len(data.train):,} train / {len(data.val):,} val tokens ({'cached' if data.cached else 'tokenized'} in {data.folder})"

    def model_config(self, model: ModelConfig, data: TokenData) -> ModelConfig:
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size)

    def sampler(self, data: TokenData, seed: int) -> _Windows:
        return _Windows(data.train, self.cfg.train.seq_len, seed=seed)

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
        """`train.samples` continuations of `train.sample_prompt`, decoded with the KV cache (a
        rolling sink + window cache past the context when the positions are relative; past the
        context with absolute positions, the last max_seq_len tokens are recomputed per step),
        through anyformer.generation's logit processing."""
        from ..generation import GenerationConfig, generate
        from ..generation.window import window_steps

        t = self.cfg.train
        if not t.samples:
            return []
        tok = data.tokenizer
        ids = tok.encode(t.sample_prompt)
        context = self.cfg.model.max_seq_len
        config = GenerationConfig(max_new_tokens=t.sample_tokens, do_sample=t.temperature > 0, temperature=t.temperature,
                                  top_k=t.top_k or 0, seed=t.seed)
        model.eval()
        if len(ids) + t.sample_tokens > context and model.decoding_info().absolute_positions:  # type: ignore[operator]
            new = torch.stack(list(window_steps(model, [ids] * t.samples, config, context=context)), dim=1)  # (samples, sample_tokens)
        else:
            window = context - 4 if len(ids) + t.sample_tokens > context else None
            new = generate(model, [ids] * t.samples, config, window=window)[:, len(ids):]
        model.train()
        return [t.sample_prompt + tok.decode(row.tolist()) for row in new]
