"""Masked (absorbing-state) diffusion language modelling with an encoder, as in MDLM / LLaDA.

Legend: `b` batch, `n` window length, `V` vocabulary (the text's tokens plus the mask id).

The forward process masks every token of a text independently with probability t (the masking
rate, the diffusion time: all masked at t = 1). The model, an encoder reading the whole window
in both directions, predicts the original token at every masked position. With the linear
schedule (a token survives to time t with probability 1 - t) the negative log-likelihood of a
window x of n tokens is bounded by (the ELBO of MDLM, Sahoo et al. 2024, and LLaDA):

    -log p(x) <= E_{t ~ U(0, 1)} E_{z ~ q(z | x, t)} [ (1/t) * sum_{i masked in z} -log p(x_i | z) ]

Training minimises this bound per token: each window gets its own t (drawn stratified across the
global batch: t_i = eps + (1 - eps) * ((u + i / B) mod 1) for one uniform u per batch, lower
variance than independent draws), and the loss of a batch is the mean over windows of
(1 / t) * sum of the masked positions' cross-entropies / n. The mask id is never a prediction
(its logit is set to -inf), so the model's distribution is over the text's tokens only.

Evaluation: the same bound per token on fixed held-out windows, estimated with `eval_rates`
masking rates per window (stratified: one in each of `eval_rates` equal parts of [eps, 1]) and
a random mask per rate, all from fixed seeds (the same at every call), in nats per token
(`val_loss`) and bits per token; with the char tokenizer that is per character, directly
comparable with a causal decoder's validation loss on the same text.

Generation (`anyformer generate`, `anyformer infill`, `anyformer predict`): anyformer/generation/diffusion.py.
`predict` reads a text whose gaps are written [[N]] (N tokens to fill each) and prints it filled;
a text with no gap is continued by `length` tokens.

Task options: eps (1e-3), eval_rates (8), sample_steps (64), sample_order ('confidence'), and the samples'
sample_prompt, sample_tokens, temperature, top_k (SampleOptions).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data import TokenData, prepare_tokens
from ..data.sampler import SeededSampler
from ..distributed import mean_across
from ..dtypes import DTYPES
from ..generation.diffusion import ORDERS, DiffusionConfig, StepCallback, diffusion_fill, diffusion_generate
from .base import TASKS, SampleOptions, Setting, Task

EVAL_SEED = 20241111
GAP = re.compile(r"\[\[(\d+)\]\]")  # a gap of N tokens in a `predict` input: [[N]]
RATE_SCALE = 2**52  # a masking rate travels in a sampler row as an integer code: u * RATE_SCALE


@dataclass
class MaskedDiffusionOptions(SampleOptions):
    """Options of task 'masked_diffusion'. eps: the smallest masking rate (rates are drawn in
    [eps, 1]); eval_rates: masking rates per held-out window in the evaluation's estimate of the
    bound; sample_steps / sample_order: the unmasking steps and order of the samples shown at
    the end of a run (whose prompt, length and sampling are SampleOptions')."""

    eps: float = 1e-3
    eval_rates: int = 8
    sample_steps: int = 64
    sample_order: str = "confidence"


def masked_inputs(window: Tensor, rate: float, mask_id: int, generator: torch.Generator) -> Tensor:
    """One window (n,) with each token replaced by the mask id with probability `rate`."""
    masked = torch.rand(window.shape, generator=generator) < rate
    return torch.where(masked, torch.full_like(window, mask_id), window)


def diffusion_loss(logits: Tensor, inputs: Tensor, targets: Tensor, rates: Tensor, mask_id: int) -> Tensor:
    """The bound per token averaged over windows: mean_b (1 / t_b) * sum_{i: inputs[b, i] is the
    mask} CE(logits[b, i], targets[b, i]) / n, for logits (b, n, V), inputs and targets (b, n),
    rates (b,); the mask id's logit is excluded (set to -inf)."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    ce = torch.where(inputs == mask_id, ce, torch.zeros_like(ce))
    return (ce.sum(-1) / rates / targets.shape[1]).mean()


class DiffusionSampler(SeededSampler):
    """Random training windows, each with its own masking rate and mask. `draw` gives (b, 3)
    rows of (window start, mask seed, rate code): the rates stratified across the batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, mask_id: int, eps: float, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one window of train.seq_len={seq_len}; "
                             "use a shorter train.seq_len or more data")
        super().__init__(len(tokens) - seq_len + 1, seed)
        self.tokens, self.seq_len, self.mask_id, self.eps = tokens, seq_len, mask_id, eps

    def draw(self, batch: int) -> Tensor:
        rows = super().draw(batch)  # (start, seed)
        u = (torch.rand((), generator=self.generator, dtype=torch.float64) + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
        return torch.cat([rows, (u * RATE_SCALE).long()[:, None]], 1)

    def rate(self, code: int) -> float:
        """The masking rate of a row's code."""
        return self.eps + (1.0 - self.eps) * code / RATE_SCALE

    def batch(self, rows: Tensor) -> tuple[Tensor, ...]:
        """(masked inputs, targets, rates): (b, n), (b, n) int64 and (b,) float32."""
        idx = rows[:, 0].numpy()[:, None] + np.arange(self.seq_len)
        targets = torch.from_numpy(self.tokens[idx].astype(np.int64))
        rates = torch.tensor([self.rate(int(c)) for c in rows[:, 2].tolist()], dtype=torch.float32)
        inputs = torch.stack([masked_inputs(w, float(r), self.mask_id, torch.Generator().manual_seed(int(s)))
                              for w, r, s in zip(targets, rates, rows[:, 1].tolist())])
        return inputs, targets, rates


@TASKS.register("masked_diffusion")
class MaskedDiffusion(Task):
    """Masked-diffusion language modelling of `data.corpus` with an encoder (head 'mlm'); the
    mask is the id after the tokenizer's vocabulary."""

    architectures = ("encoder",)
    options_class = MaskedDiffusionOptions
    training_options = frozenset({"sample_steps", "sample_order", "sample_prompt", "sample_tokens", "temperature", "top_k"})  # the end-of-run samples
    loss_unit = "nats/token"
    use_command = 'anyformer predict RUN "TEXT WITH A [[N]] GAP"'
    commands = ("infill",)
    generates = "diffusion"
    predict_input = 'a text with each gap to fill written [[N]] (N tokens), e.g. "To be, or [[7]] be"; a text with no gap is continued'
    predict_settings = {
        "length": Setting(int, 64, "tokens added to a text that has no gap"),
        "steps": Setting(int, 0, "model calls to draft the filled tokens, at most one per token (0: 64, or the tokens if fewer)"),
        "order": Setting(str, "confidence", f"which masked positions are drafted first: {', '.join(ORDERS)}"),
        "edit": Setting(bool, False, "low-confidence remasking: earlier drafts compete with new ones and the least confident are redrawn"),
        "temperature": Setting(float, 0.8, "sampling temperature (0: the most likely token)"),
        "top_k": Setting(int, 0, "draw among the k most likely tokens (0: all)"),
        "seed": Setting(int, None, "random seed of the draws"),
        "mark": Setting(bool, False, "show each filled gap between [[ and ]]"),
    }
    mask_id: int  # set by prepare(): the id after the tokenizer's vocabulary

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options = parse_options(MaskedDiffusionOptions, cfg.task.options, "task.options (masked_diffusion)")
        if not 0 < o.eps < 1:
            raise ConfigError(f"task.options.eps (the smallest masking rate) must be in (0, 1), got {o.eps}")
        if o.eval_rates < 1:
            raise ConfigError(f"task.options.eval_rates must be at least 1, got {o.eval_rates}")
        if o.sample_steps < 1:
            raise ConfigError(f"task.options.sample_steps must be at least 1, got {o.sample_steps}")
        if o.sample_order not in ORDERS:
            raise ConfigError(f"task.options.sample_order must be one of {', '.join(ORDERS)}; got {o.sample_order!r}")
        o.check_samples()

    def sample_tokens(self) -> int:
        return self.options.sample_tokens

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.model.head.kind not in ("none", "mlm"):
            raise ConfigError(f"task 'masked_diffusion' trains the 'mlm' head (a token distribution at every position); "
                              f"this run has model.head.kind={cfg.model.head.kind!r}")
        if cfg.train.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"train.seq_len={cfg.train.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}")

    def prepare(self, env: Any) -> TokenData:
        d = self.cfg.data
        data = prepare_tokens(d.corpus, path=d.path, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                              cache_dir=d.cache_dir)
        self.mask_id = data.tokenizer.vocab_size
        return data

    def describe(self, data: TokenData) -> str:
        return (f"data {len(data.train):,} train / {len(data.val):,} val tokens ({'cached' if data.cached else 'tokenized'} in "
                f"{data.folder}); mask id {data.tokenizer.vocab_size}")

    def model_config(self, model: ModelConfig, data: TokenData) -> ModelConfig:
        head = dataclasses.replace(model.head, kind="mlm")
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size + 1, head=head)

    def sampler(self, data: TokenData, seed: int) -> DiffusionSampler:
        return DiffusionSampler(data.train, self.cfg.train.seq_len, data.tokenizer.vocab_size, self.options.eps, seed)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        inputs, targets, rates = batch
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inputs)
        return diffusion_loss(logits, inputs, targets, rates, self.mask_id)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TokenData, env: Any, batches: int | None = None) -> dict[str, float]:
        """The bound per token on fixed held-out windows (module docstring), in nats and bits."""

        t, o = self.cfg.train, self.options
        mask_id = data.tokenizer.vocab_size
        sampler = DiffusionSampler(data.val, t.seq_len, mask_id, o.eps, EVAL_SEED)
        was_training = model.training
        model.eval()
        dtype = DTYPES[t.dtype]
        total = torch.zeros((), dtype=torch.float64, device=env.device)
        n = batches or t.eval_batches
        per = t.batch_size // env.world
        for _ in range(n):
            rows = sampler.draw(t.batch_size)[env.rank * per : (env.rank + 1) * per]
            seeds = torch.randint(0, 2**62, (len(rows), o.eval_rates), generator=sampler.generator)
            for k in range(o.eval_rates):  # stratified rates: one in each part of [0, 1)
                u = (k + torch.rand(len(rows), generator=sampler.generator, dtype=torch.float64)) / o.eval_rates
                part = torch.stack([rows[:, 0], seeds[:, k], (u * RATE_SCALE).long()], 1)
                inputs, targets, rates = (a.to(env.device) for a in sampler.batch(part))
                with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits = model(inputs)
                total += diffusion_loss(logits, inputs, targets, rates, mask_id).double()
        model.train(was_training)
        loss = float(mean_across(total / (n * o.eval_rates), env))
        return {"val_loss": loss, "bits_per_token": loss / math.log(2), "perplexity_bound": math.exp(loss)}

    def samples(self, model: nn.Module, data: TokenData) -> list[str]:
        """`train.samples` continuations of `task.options.sample_prompt` drafted by iterative unmasking
        (`sample_steps` steps per block, order `sample_order`)."""
        t, o = self.cfg.train, self.options
        if not t.samples:
            return []
        tok = data.tokenizer
        ids = tok.encode(o.sample_prompt)
        model.eval()
        texts = []
        for i in range(t.samples):
            config = DiffusionConfig(steps=o.sample_steps, temperature=o.temperature, top_k=o.top_k or 0,
                                     order=o.sample_order, seed=t.seed + i)
            new = diffusion_generate(model, ids, o.sample_tokens, tok.vocab_size, self.cfg.model.max_seq_len, config)
            texts.append(o.sample_prompt + tok.decode(new))
        model.train()
        return texts

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """Each input with its [[N]] gaps filled, or (with no gap) continued by `length` tokens."""
        for text in inputs:
            if len(inputs) > 1:
                yield f"== {text}"
            pieces = GAP.split(text)  # text, N, text, N, ..., text
            texts, gaps = pieces[0::2], [int(n) for n in pieces[1::2]]
            if not gaps:
                yield self.continue_text(model, tokenizer, text, settings)
                continue
            filled = self.fill(model, tokenizer, texts, gaps, settings)
            yield "".join(t + (f"[[{f}]]" if settings["mark"] else f) for t, f in zip(texts, filled)) + texts[-1]

    def drafting(self, settings: dict[str, Any], tokens: int) -> DiffusionConfig:
        """The DiffusionConfig of the prediction settings for drafting `tokens` tokens together;
        a bad setting raises ValueError naming it."""
        steps = settings["steps"] or min(64, tokens)
        if steps > tokens:
            raise ValueError(f"steps={steps} is more than the {tokens} tokens drafted together; use at most {tokens} (one token per step)")
        config = DiffusionConfig(steps=steps, temperature=settings["temperature"], top_k=settings["top_k"], order=settings["order"],
                                 edit=settings["edit"], seed=settings["seed"])
        return config.validate()

    def fill(self, model: nn.Module, tokenizer: Any, texts: list[str], gaps: list[int], settings: dict[str, Any],
             on_step: StepCallback | None = None) -> list[str]:
        """The texts that fill `gaps[i]` tokens between texts[i] and texts[i + 1] (the given texts
        are never changed), drafted together by iterative unmasking."""
        if any(n < 1 for n in gaps):
            raise ValueError(f"a gap must hold at least 1 token; got {', '.join(str(n) for n in gaps)}")
        try:
            parts = [tokenizer.encode(t) for t in texts]
        except ValueError as e:
            raise ValueError(f"the text cannot be encoded by this run's tokenizer: {e}") from None
        context = self.cfg.model.max_seq_len
        total = sum(map(len, parts)) + sum(gaps)
        if total > context:
            raise ValueError(f"the texts ({sum(map(len, parts))} tokens) and gaps ({sum(gaps)} tokens) make {total} tokens, more than "
                             f"the model's context of {context}; shorten the texts or the gaps")
        mask_id = tokenizer.vocab_size
        ids, fill = list(parts[0]), [False] * len(parts[0])
        for n, part in zip(gaps, parts[1:]):
            ids += [mask_id] * n + part
            fill += [True] * n + [False] * len(part)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        filled = diffusion_fill(model, torch.tensor([ids], device=device), torch.tensor([fill], device=device), mask_id,
                                self.drafting(settings, sum(gaps)), on_step=on_step)[0].tolist()
        model.train(was_training)
        out, at = [], len(parts[0])
        for n, part in zip(gaps, parts[1:]):
            out.append(tokenizer.decode(filled[at : at + n]))
            at += n + len(part)
        return out

    def continue_text(self, model: nn.Module, tokenizer: Any, text: str, settings: dict[str, Any]) -> str:
        """`text` followed by `length` tokens drafted block by block (a block as long as the
        context allows, else half the context)."""
        new, context = settings["length"], self.cfg.model.max_seq_len
        if new < 1:
            raise ValueError(f"length must be at least 1 token, got {new}")
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:
            raise ValueError(f"the text cannot be encoded by this run's tokenizer: {e}") from None
        block = new if len(ids) + new <= context else context // 2
        was_training = model.training
        model.eval()
        produced = diffusion_generate(model, ids, new, tokenizer.vocab_size, context, self.drafting(settings, min(block, new)), block=block)
        model.train(was_training)
        return text + tokenizer.decode(produced)
