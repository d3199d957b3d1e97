"""Causal language modelling: next-token prediction on a text corpus (the default task)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..data import TokenData, WindowSampler, prepare_tokens
from .base import TASKS, Task


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
        from ..training.trainer import lm_loss

        x, y = batch
        return lm_loss(model, x, y, dtype)

    def evaluate(self, model: nn.Module, data: TokenData, env: Any, batches: int | None = None) -> dict[str, float]:
        from ..training.trainer import evaluate

        return {"val_loss": evaluate(model, data.val, self.cfg.train, env, batches=batches)}

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
