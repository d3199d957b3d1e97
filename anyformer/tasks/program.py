"""A program's output at every position of its input (a RASP program in a program file,
`anyformer/convert/tracr.py`): learned from examples by an encoder with a token-classification
head, or compiled into weights by `anyformer convert --from tracr PROGRAM.py OUT`.

Examples are random inputs, the held-out ones never among the training ones (a length drawn between `min_len` and the program's max_seq_len, each
token drawn from its vocab) after a BOS token, labelled by RASP's own evaluator (tracr's). A
categorical program is a label per position (cross-entropy); a numerical one a value per
position (squared error). Metrics: loss, the fraction of positions right (a numerical value
within 1e-3), the fraction of inputs right at every position, and for a categorical program the
baseline that always answers the training split's most frequent output. Positions where the
program gives no value (None) are not scored.

Task options: program (the program file), outputs (the output values in label order; written by
`convert --from tracr` so a compiled model's labels are tracr's; null: the values seen in the
examples, sorted), train_examples (4096), val_examples (512), min_len (1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.sampler import SeededSampler
from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES
from ..tokenizers.pair import PairTokenizer
from ..tokenizers.words import WordTokenizer
from .base import TASKS, Task

EVAL_SEED = 20240607
IGNORE = -100  # the label of BOS, padding and positions without a value
NUMERICAL_TOLERANCE = 1e-3


@dataclass
class ProgramOptions:
    """Options of task 'program'."""

    program: str = ""
    outputs: list[str] | None = None
    train_examples: int = 4096
    val_examples: int = 512
    min_len: int = 1


@dataclass
class ProgramData:
    """Inputs (BOS first) and their per-position targets, for both splits."""

    tokenizer: PairTokenizer  # source: the input words (BOS and PAD included); target: the output values
    numerical: bool
    train: list[tuple[Tensor, Tensor]]
    val: list[tuple[Tensor, Tensor]]
    majority: int | None  # the most frequent training label (categorical)


class ProgramSampler(SeededSampler):
    """Random examples, padded to the longest in the batch: (ids, keep, targets)."""

    def __init__(self, examples: list[tuple[Tensor, Tensor]], pad_id: int, numerical: bool, seed: int) -> None:
        super().__init__(len(examples), seed, empty="no examples; raise task.options.train_examples")
        self.examples, self.pad_id, self.numerical = examples, pad_id, numerical

    def example(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.examples[index]

    def collate(self, examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        n = max(len(x) for x, _ in examples)
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        keep = torch.zeros(len(examples), n, dtype=torch.bool)
        targets = torch.full((len(examples), n), float("nan") if self.numerical else IGNORE,
                             dtype=torch.float32 if self.numerical else torch.long)
        for i, (x, y) in enumerate(examples):
            ids[i, : len(x)], keep[i, : len(x)], targets[i, : len(y)] = x, True, y
        return ids, keep, targets


@TASKS.register("program")
class ProgramTask(Task):
    """A RASP program's output per position, with an encoder and a token-classification head."""

    architectures = ("encoder",)
    reads_seq_len = False  # an example is as long as its random input
    loss_unit = "nats/token"  # per scored position (a numerical program's loss: squared error per position)
    options_class = ProgramOptions
    use_command = 'anyformer predict RUN "TOKENS"'
    predict_input = "the program's input tokens, separated by spaces"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = parse_options(ProgramOptions, cfg.task.options, "task.options (program)")
        o = self.options
        if not o.program:
            raise ConfigError("task 'program' needs task.options.program: the path of a program file (see configs/theory/programs)")
        if o.train_examples < 1 or o.val_examples < 1 or o.min_len < 1:
            raise ConfigError(f"task.options.train_examples, val_examples and min_len must be positive, got "
                              f"{o.train_examples}, {o.val_examples}, {o.min_len}")

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.model.head.kind not in ("none", "token_classification"):
            raise ConfigError(f"task 'program' trains the 'token_classification' head; this run has model.head.kind={cfg.model.head.kind!r}")

    def tokens_per_example(self) -> int:
        return self.cfg.model.max_seq_len

    def prepare(self, env: Any) -> ProgramData:
        from ..convert.tracr import input_words, load_program

        o = self.options
        prog = load_program(o.program)  # names the [tracr] extra when tracr is missing
        from tracr.rasp import rasp
        if prog.max_seq_len + 1 > self.cfg.model.max_seq_len:
            raise ConfigError(f"the program reads up to {prog.max_seq_len} tokens plus BOS; set model.max_seq_len to at least {prog.max_seq_len + 1}")
        if o.min_len > prog.max_seq_len:
            raise ConfigError(f"task.options.min_len={o.min_len} is past the program's max_seq_len={prog.max_seq_len}")
        numerical = rasp.is_numerical(prog.program)
        g = torch.Generator().manual_seed(self.cfg.train.seed)

        def draw(count: int, avoid: set[tuple[int, ...]]) -> list[tuple[tuple[int, ...], list[Any], list[Any]]]:
            """(vocab indices, input values, the program's outputs) of `count` random inputs not in `avoid`."""
            out = []
            for _ in range(50 * count):
                n = int(torch.randint(o.min_len, prog.max_seq_len + 1, (1,), generator=g))
                picks = tuple(torch.randint(0, len(prog.vocab), (n,), generator=g).tolist())
                if picks in avoid:
                    continue
                xs = [prog.vocab[i] for i in picks]
                out.append((picks, xs, rasp.evaluate(prog.program, xs)))
                if len(out) == count:
                    break
            return out

        raw_train = draw(o.train_examples, set())
        raw_val = draw(o.val_examples, {picks for picks, _, _ in raw_train})  # held-out inputs are never training inputs
        if len(raw_val) < o.val_examples:
            raise ConfigError(f"only {len(raw_val)} of task.options.val_examples={o.val_examples} held-out inputs differ from every "
                              f"training input (the program has few distinct inputs); lower train_examples or val_examples")
        if numerical:
            labels: list[str] = []
        elif o.outputs is not None:
            labels = list(o.outputs)
        else:
            labels = sorted({str(v) for _, _, ys in raw_train + raw_val for v in ys if v is not None})
        target, source = WordTokenizer(labels), WordTokenizer(input_words(prog))
        tok = PairTokenizer(source, target)

        def encode(xs: list[Any], ys: list[Any]) -> tuple[Tensor, Tensor]:
            ids = torch.tensor([source.index[prog.bos], *(source.index[str(x)] for x in xs)])
            if numerical:
                y = [float("nan")] + [float("nan") if v is None else float(v) for v in ys]
                return ids, torch.tensor(y, dtype=torch.float32)
            unknown = sorted({str(v) for v in ys if v is not None and str(v) not in target.index})
            if unknown:
                raise ConfigError(f"the program outputs {unknown}, which task.options.outputs does not list")
            return ids, torch.tensor([IGNORE] + [IGNORE if v is None else target.index[str(v)] for v in ys])

        train, val = [encode(xs, ys) for _, xs, ys in raw_train], [encode(xs, ys) for _, xs, ys in raw_val]
        majority = None
        if not numerical:
            counts = torch.bincount(torch.cat([y[y != IGNORE] for _, y in train]), minlength=max(1, len(labels)))
            majority = int(counts.argmax())
        return ProgramData(tok, numerical, train, val, majority)

    def describe(self, data: ProgramData) -> str:
        kind = "a value" if data.numerical else f"one of {data.tokenizer.target.vocab_size} outputs"
        return (f"data {len(data.train):,} train / {len(data.val):,} held-out random inputs of {self.options.program}, "
                f"{kind} per position")

    def model_config(self, model: ModelConfig, data: ProgramData) -> ModelConfig:
        labels = 1 if data.numerical else data.tokenizer.target.vocab_size
        head = dataclasses.replace(model.head, kind="token_classification", num_labels=labels)
        return dataclasses.replace(model, vocab_size=data.tokenizer.source.vocab_size, head=head,
                                   pad_token_id=1)  # input_words: BOS is id 0, PAD id 1

    def sampler(self, data: ProgramData, seed: int) -> ProgramSampler:
        return ProgramSampler(data.train, 1, data.numerical, seed)

    def _scores(self, out: Tensor, targets: Tensor, numerical: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(summed loss, right per scored position, scored positions) of outputs (b, n, c)."""
        if numerical:
            scored = ~targets.isnan()
            err = out[..., 0].float() - torch.nan_to_num(targets)
            return (err.pow(2) * scored).sum(), (err.abs() <= NUMERICAL_TOLERANCE) & scored, scored
        scored = targets != IGNORE
        loss = F.cross_entropy(out.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (out.argmax(-1) == targets) & scored, scored

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        ids, keep, targets = batch
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids, keep)  # (b, n, c)
        total, _, scored = self._scores(out, targets, targets.is_floating_point())
        return total / scored.sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ProgramData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss, position and whole-input accuracy over every held-out input (and the majority baseline)."""
        t = self.cfg.train
        sampler = ProgramSampler(data.val, 1, data.numerical, EVAL_SEED)
        rows = torch.stack([torch.arange(len(data.val)), torch.zeros(len(data.val), dtype=torch.long)], 1)[env.rank :: env.world]
        was_training = model.training
        model.eval()
        dtype = DTYPES[t.dtype]
        sums = torch.zeros(6, dtype=torch.float64, device=env.device)  # loss, right, positions, inputs right, inputs, majority right
        for part in split_evenly(rows, len(data.val), t.batch_size, env):
            if not len(part):
                continue
            ids, keep, targets = (a.to(env.device) for a in sampler.batch(part))
            with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(ids, keep)
            loss, right, scored = self._scores(out, targets, data.numerical)
            sums[0] += loss.double()
            sums[1] += right.sum()
            sums[2] += scored.sum()
            sums[3] += (right == scored).all(-1).sum()
            sums[4] += len(ids)
            if data.majority is not None:
                sums[5] += ((targets == data.majority) & scored).sum()
        model.train(was_training)
        sums = mean_across(sums, env)
        out = {"val_loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2]), "exact_inputs": float(sums[3] / sums[4])}
        if data.majority is not None:
            out["majority_accuracy"] = float(sums[5] / sums[2])
        return out

    def read_input(self, text: str, tokenizer: PairTokenizer) -> Tensor:
        """BOS, then the words of `text`: (1, n)."""
        source = tokenizer.source
        ids = source.encode(text)
        if not ids:
            raise ValueError("the input is empty; give the program's input tokens separated by spaces")
        if len(ids) + 1 > self.cfg.model.max_seq_len:
            raise ValueError(f"the input has {len(ids)} tokens; this program reads at most {self.cfg.model.max_seq_len - 1}")
        reserved = {source.words[0], source.words[1]}
        if any(source.words[i] in reserved for i in ids):
            raise ValueError(f"the input holds {' or '.join(sorted(reserved))}, which the program adds itself; give only its input values")
        return torch.tensor([[0, *ids]])

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        x = self.read_input(text, tokenizer)
        return x, [tokenizer.source.words[i] for i in x[0].tolist()]

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """Each input and the program's output at every position, as the model computes them."""
        device = next(model.parameters()).device
        labels = tokenizer.target.words
        for text in inputs:
            x = self.read_input(text, tokenizer).to(device)
            with torch.no_grad():
                out = model(x)[0, 1:].float()  # (n, c), BOS dropped
            if labels:
                answer = " ".join(labels[i] for i in out.argmax(-1).tolist())
            else:
                answer = " ".join(f"{v:.6g}" for v in out[:, 0].tolist())
            yield f"{' '.join(text.split())} -> {answer}"
