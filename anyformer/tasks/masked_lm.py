"""Masked language modelling of protein sequences, ESM-style, with an encoder.

Each training example is one protein: <cls>, its residues (a random window of seq_len - 2 of
them when longer), <eos>, padding. BERT-style masking: each residue is selected with
probability `mask_prob` (at least one per sequence); a selected residue becomes <mask> with
probability 0.8, a random standard amino acid with 0.1, and stays itself with 0.1; the loss is
the cross-entropy at the selected positions. Held-out proteins are chosen by a hash of their
ids (`data.val_fraction`). Evaluation reports the masked-residue loss, perplexity and
accuracy, beside a unigram baseline: every masked residue predicted from the amino-acid
frequencies of the training split.

Task options: mask_prob (0.15).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.proteins import ProteinTokenizer, packaged_proteins, read_fasta
from ..data.sampler import SeededSampler
from ..data.split import held_out
from ..distributed import mean_across
from ..dtypes import DTYPES
from .base import TASKS, Setting, Task

EVAL_SEED = 20240601


@dataclass
class MaskedLMOptions:
    """Options of task 'masked_lm'. mask_prob: share of residues selected for prediction."""

    mask_prob: float = 0.15


@dataclass
class ProteinData:
    """Tokenized proteins of both splits and the training split's residue frequencies."""

    tokenizer: ProteinTokenizer
    train: list[Tensor]
    val: list[Tensor]
    train_names: list[str]
    val_names: list[str]
    unigram: Tensor  # (V,) log-probabilities of each id among training residues


def mask_tokens(tokens: Tensor, keep: Tensor, tok: ProteinTokenizer, prob: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT-style masking of one row: (inputs, targets) for tokens (n,) with residue positions
    `keep` (n,) bool; targets are -100 except at the selected positions."""
    n = tokens.shape[0]
    selected = (torch.rand(n, generator=g) < prob) & keep
    if not bool(selected.any()):  # at least one prediction per sequence
        choices = keep.nonzero().flatten()
        selected[choices[torch.randint(len(choices), (1,), generator=g)]] = True
    targets = torch.where(selected, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(n, generator=g)
    standard = torch.tensor(tok.standard_ids)
    random_ids = standard[torch.randint(len(standard), (n,), generator=g)]
    inputs = torch.where(selected & (roll < 0.8), torch.full_like(tokens, tok.mask_id), tokens)
    inputs = torch.where(selected & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, targets


class ProteinSampler(SeededSampler):
    """Random proteins of a split, each example (crop, masking) built from its own seed."""

    def __init__(self, proteins: list[Tensor], tok: ProteinTokenizer, seq_len: int, prob: float, seed: int) -> None:
        super().__init__(len(proteins), seed, empty="no proteins in this split; give more data or change data.val_fraction")
        self.proteins, self.tok, self.seq_len, self.prob = proteins, tok, seq_len, prob

    def batch(self, rows: Tensor) -> tuple[Tensor, ...]:
        """(inputs, attention mask, targets), each (b, seq_len)."""
        b, n = rows.shape[0], self.seq_len
        inputs = torch.full((b, n), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((b, n), -100, dtype=torch.long)
        keep = torch.zeros(b, n, dtype=torch.bool)
        for i, (p, g) in enumerate(self.seeded(rows)):
            seq = self.proteins[p]
            room = n - 2
            if len(seq) > room:  # a random window of a long protein
                start = int(torch.randint(0, len(seq) - room + 1, (1,), generator=g))
                seq = seq[start : start + room]
            row = torch.cat([torch.tensor([self.tok.cls_id]), seq, torch.tensor([self.tok.eos_id])])
            residues = torch.zeros(len(row), dtype=torch.bool)
            residues[1:-1] = True
            x, y = mask_tokens(row, residues, self.tok, self.prob, g)
            inputs[i, : len(row)], targets[i, : len(row)], keep[i, : len(row)] = x, y, True
        return inputs, keep, targets


@TASKS.register("masked_lm")
class MaskedLM(Task):
    """Protein masked language modelling with an encoder (head 'mlm')."""

    architectures = ("encoder",)
    loss_unit = "nats/token"
    use_command = 'anyformer fill-mask RUN "SEQUENCE"'
    commands = ("fill-mask",)
    predict_input = 'residues with <mask> where a prediction is wanted, e.g. "MKT<mask>AYIAKQR"'
    predict_settings = {"top": Setting(int, 5, "predictions shown per masked position")}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = parse_options(MaskedLMOptions, cfg.task.options, "task.options (masked_lm)")
        if not 0 < self.options.mask_prob < 1:
            raise ConfigError(f"task.options.mask_prob must be in (0, 1), got {self.options.mask_prob}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.model.head.kind not in ("none", "mlm"):
            raise ConfigError(f"task 'masked_lm' trains the 'mlm' head; this run has model.head.kind={cfg.model.head.kind!r}")
        if cfg.data.corpus != "proteins" and not cfg.data.path:
            raise ConfigError("task 'masked_lm' reads proteins: set data.corpus=proteins (pyhmmer's test data) or data.path to a FASTA file")

    def prepare(self, env: Any) -> ProteinData:
        d = self.cfg.data
        path = d.path if d.path else packaged_proteins()
        tok = ProteinTokenizer()
        train, val, train_names, val_names = [], [], [], []
        for name, seq in read_fasta(path):
            ids = torch.tensor(tok.encode(seq), dtype=torch.long)
            if len(ids) == 0:
                continue
            (val if held_out(name, d.val_fraction) else train).append(ids)
            (val_names if held_out(name, d.val_fraction) else train_names).append(name)
        if not train or not val:
            raise ValueError(f"{path}: the split left {len(train)} training and {len(val)} held-out proteins; both need some")
        counts = torch.bincount(torch.cat(train), minlength=tok.vocab_size).double() + 1.0  # add-one smoothing
        counts[[tok.cls_id, tok.pad_id, tok.eos_id, tok.mask_id]] = 0.0
        unigram = (counts / counts.sum()).log().float()
        return ProteinData(tok, train, val, train_names, val_names, unigram)

    def describe(self, data: ProteinData) -> str:
        residues = sum(len(p) for p in data.train), sum(len(p) for p in data.val)
        return f"data {len(data.train):,} train / {len(data.val):,} held-out proteins ({residues[0]:,} / {residues[1]:,} residues)"

    def model_config(self, model: ModelConfig, data: ProteinData) -> ModelConfig:
        head = dataclasses.replace(model.head, kind="mlm")
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size, pad_token_id=data.tokenizer.pad_id, head=head)

    def sampler(self, data: ProteinData, seed: int) -> ProteinSampler:
        return ProteinSampler(data.train, data.tokenizer, self.cfg.train.seq_len, self.options.mask_prob, seed)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        inputs, keep, targets = batch
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(inputs, keep)  # (b, n, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        """Masked positions in the batch: the loss is their mean over the whole global batch."""
        return (batch[2] != -100).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ProteinData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Masked-residue loss, perplexity and accuracy on fixed held-out examples (the same at
        every call), and the unigram baseline's loss and perplexity on the same positions."""
        t = self.cfg.train
        sampler = ProteinSampler(data.val, data.tokenizer, t.seq_len, self.options.mask_prob, EVAL_SEED)
        was_training = model.training
        model.eval()
        dtype = DTYPES[t.dtype]
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, baseline loss, correct, count
        per = t.batch_size // env.world
        for _ in range(batches or t.eval_batches):
            rows = sampler.draw(t.batch_size)[env.rank * per : (env.rank + 1) * per]
            inputs, keep, targets = (a.to(env.device) for a in sampler.batch(rows))
            with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(inputs, keep).float()
            sel = targets != -100
            y = targets[sel]
            sums[0] += F.cross_entropy(logits[sel], y, reduction="sum").double()
            sums[1] -= data.unigram.to(env.device)[y].double().sum()
            sums[2] += (logits[sel].argmax(-1) == y).sum()
            sums[3] += sel.sum()
        model.train(was_training)
        sums = mean_across(sums, env)  # proportional to the sums over every process
        loss, base = float(sums[0] / sums[3]), float(sums[1] / sums[3])
        return {"val_loss": loss, "perplexity": math.exp(loss), "accuracy": float(sums[2] / sums[3]),
                "unigram_loss": base, "unigram_perplexity": math.exp(base)}

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """Per <mask>, the most likely tokens and their probabilities; then the sequence with
        every <mask> filled by its most likely residue."""
        if settings["top"] < 1:
            raise ValueError(f"top must be at least 1, got {settings['top']}")
        tok, device = tokenizer, next(model.parameters()).device
        for sequence in inputs:
            body = tok.encode(sequence)
            letters = re.sub(r"<[^>]*>", "", sequence)  # special tokens written out are the tokenizer's to check
            bad = sorted({c for c in letters if c.upper() not in tok.index})
            if bad:  # the tokenizer maps them to <unk>, as it does in training data; a query names them
                raise ValueError(f"{''.join(bad)!r} are not residues of this vocabulary (amino-acid letters "
                                 f"{''.join(t for t in tok.tokens if len(t) == 1)}); write <unk> for an unknown residue")
            masks = [i for i, t in enumerate(body) if t == tok.mask_id]
            if not masks:
                raise ValueError("the sequence has no <mask>; put <mask> where a residue should be predicted")
            ids = [tok.cls_id, *body, tok.eos_id]
            if len(ids) > self.cfg.model.max_seq_len:
                raise ValueError(f"the sequence has {len(body)} tokens; this model reads at most {self.cfg.model.max_seq_len - 2}")
            with torch.no_grad():
                probs = model(torch.tensor([ids], device=device)).float().softmax(-1)[0]  # (n, V)
            if len(inputs) > 1:
                yield f"== {sequence}"
            filled = list(body)
            for i in masks:
                p = probs[i + 1]
                top = p.topk(min(settings["top"], p.numel()))
                yield f"position {i + 1:>4}: " + "  ".join(f"{tok.decode([int(j)])} {float(v):.3f}" for v, j in zip(top.values, top.indices))
                filled[i] = next(j for j in p.argsort(descending=True).tolist() if j in tok.standard_ids or tok.tokens[j] in "XBUZO")
            yield f"filled         {tok.decode(filled)}"
