"""Method naming: predict a Python function's name (as subtokens) from its body, the setting
of OGB's ogbg-code2 (Hu et al. 2020) and the headline of Geisler et al. 2023, "Transformers
Meet Directed Graphs".

Data (`data.corpus`): `stdlib` reads this Python's standard library (test/, idlelib/ and
site-packages skipped), `python` the folder (or one file) of Python code at `data.path`. Each
function is a directed graph of its AST (anyformer/data/code_graphs.py: node tokens, the
parent -> child, next-sibling and definition -> use edges, the name removed from its own
input). Files are split by a hash of their path (`data.val_fraction` held out). Functions with
more nodes than `model.max_seq_len` are dropped (the count is in the run's first line).
Vocabularies come from the training split: node tokens seen at least `min_count` times (else
<unk>), name subtokens seen at least `name_min_count` times (the labels).

Model (`task.options.input`): `graph`, an encoder whose attention follows the graph's edges in
both directions plus each node itself, the directed graph given to the positional encoding
(the magnetic Laplacian's eigenvectors: direction-aware with potential q > 0, undirected with
q = 0); `positions`, full attention over the nodes with the directed graph in the positional
encoding only (Geisler et al.'s own setting); or `sequence`, the same encoder over the
linearised (pre-order) AST with ordinary positions and full attention. Padding is masked out of attention and pooling. The encoder's
`sequence_classification` head (mean of the node states -> linear, one logit per name
subtoken) is trained as a multi-label classifier with binary cross-entropy (summed over the
labels, averaged over functions: `val_loss`). A fixed offset, the log-odds of each subtoken's
training frequency, is added to the head's logits (saved with the vocabularies), so an untrained
model starts at the prior instead of at probability 1/2 for each of ~1,200 subtokens. The
predicted name is every subtoken of probability > 0.5, or the single most likely one when none
is.

Metrics (as code2): per function, precision, recall and F1 of the predicted subtoken set
against the true one (subtokens outside the label vocabulary count as missed), averaged over
the held-out functions; `exact` is the share predicted exactly. The baseline predicts, for
every function, the k most frequent training subtokens (k = 1..5 chosen by the training F1).

Training batches group functions of similar size (sorted by node count and cut into buckets
of `bucket_size`; a draw picks a bucket with probability proportional to its size, then
functions in it at random), so padding, attention and the eigendecomposition of the magnetic
encoding (cubic in the padded length) stay small; 0 draws from all functions at once.
Measured on the shared 2-core CPU with configs/code-naming-graph.yaml (batch 32, up to 256
nodes): without buckets the batches pad to 150-250 nodes and the eigendecomposition took 83% of
a training step (5.2 s a step); with buckets of 256 it took 2% (about 6x faster steps).

Task options: input (graph, positions or sequence), min_count (3), name_min_count (3), bucket_size (256).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, parse_options
from ..data.code_graphs import CodeGraph, load_code_corpus, source_graphs
from ..data.sampler import SeededSampler
from ..data.split import held_out
from ..distributed import mean_across, split_evenly
from ..dtypes import DTYPES
from ..nn.positional import POSITIONALS
from ..tokenizers.code_graph import CodeGraphVocab
from .base import TASKS, Setting, Task

CORPORA = ("stdlib", "python")


@dataclass
class MethodNamingOptions:
    """Options of task 'method_naming'."""

    input: Literal["graph", "positions", "sequence"] = "graph"
    min_count: int = 3
    name_min_count: int = 3
    bucket_size: int = 256


@dataclass
class Example:
    """One function ready for batching: node ids (n,), directed edges (E, 2) as (src, dst), the
    label ids of its name's known subtokens, and the true subtokens (all of them)."""

    tokens: Tensor
    edges: Tensor
    labels: list[int]
    target: list[str]
    name: str
    module: str

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)


@dataclass
class NamingData:
    """Both splits, the vocabularies and what the data set left out."""

    tokenizer: CodeGraphVocab
    train: list[Example]
    val: list[Example]  # sorted by size
    root: str
    files: int
    failed: list[str]
    dropped: int  # functions over the node limit
    max_nodes: int
    baseline: list[str]  # the trivial prediction: the most frequent training subtokens


def to_example(g: CodeGraph, vocab: CodeGraphVocab) -> Example:
    """A graph with its node ids and label ids under `vocab`."""
    labels = sorted({vocab.name_index[s] for s in g.target if s in vocab.name_index})
    edges = torch.tensor(g.edges(), dtype=torch.long).reshape(-1, 2)
    return Example(torch.tensor(vocab.encode_nodes(g.tokens)), edges, labels, g.target, g.name, g.module)


def collate(examples: list[Example], num_labels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad to the largest graph: tokens (b, n) (pad id 0), keep (b, n) (True = a node), the
    directed graph (b, n, n) bool in the attention-mask convention (True at [v, u] for the edge
    u -> v) and multi-hot targets (b, labels)."""
    b, n = len(examples), max(e.num_nodes for e in examples)
    tokens = torch.zeros(b, n, dtype=torch.long)
    keep = torch.zeros(b, n, dtype=torch.bool)
    graph = torch.zeros(b, n, n, dtype=torch.bool)
    targets = torch.zeros(b, num_labels)
    for i, e in enumerate(examples):
        tokens[i, : e.num_nodes], keep[i, : e.num_nodes] = e.tokens, True
        graph[i, e.edges[:, 1], e.edges[:, 0]] = True
        targets[i, e.labels] = 1.0
    return tokens, keep, graph, targets


def graph_attention(graph: Tensor, keep: Tensor) -> Tensor:
    """The attention mask (b, 1, n, n) of graph-restricted attention: each node attends its
    neighbours in both directions and itself; padding rows attend every node (their keys are
    masked by the padding mask, so no row is empty)."""
    n = graph.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=graph.device)
    return (graph | graph.transpose(1, 2) | eye | ~keep[:, :, None])[:, None]


def model_kwargs(form: str, keep: Tensor, graph: Tensor) -> dict[str, Tensor]:
    """Keyword arguments of the encoder for input form `graph` (attention mask and directed
    graph), `positions` (the directed graph for the positional encoding only) or `sequence`
    (none: full attention over the linearised AST)."""
    if form == "graph":
        return {"attn_mask": graph_attention(graph, keep), "graph": graph}
    return {"graph": graph} if form == "positions" else {}


def prior_logits(vocab: CodeGraphVocab) -> Tensor:
    """(labels,) the log-odds of each name subtoken's training frequency: a fixed offset added to
    the head's logits, so that an untrained model predicts the prior (its bias would otherwise
    need thousands of steps to get from 0 to the log-odds of rare labels, about -8)."""
    f = torch.tensor(vocab.frequencies, dtype=torch.float64)
    return (f.log() - (-f).log1p()).float()


def predicted_sets(logits: Tensor, names: list[str]) -> list[list[str]]:
    """Per row of logits (b, labels): the subtokens of probability > 0.5, or the most likely one."""
    chosen = logits > 0
    top = logits.argmax(-1)
    return [[names[j] for j in (row.nonzero().flatten().tolist() or [int(t)])] for row, t in zip(chosen, top)]


def subtoken_scores(true: list[str], predicted: list[str]) -> tuple[float, float, float]:
    """code2's precision, recall and F1 of one function's predicted subtokens (as sets)."""
    t, p = set(true), set(predicted)
    hit = len(t & p)
    precision = hit / len(p) if p else 0.0
    recall = hit / len(t) if t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def frequency_baseline(train: list[Example]) -> list[str]:
    """The k most frequent training subtokens (k in 1..5 with the best mean training F1)."""
    counts = Counter(s for e in train for s in set(e.target))
    ranked = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    best = max(range(1, 6), key=lambda k: (sum(subtoken_scores(e.target, ranked[:k])[2] for e in train), -k))
    return ranked[:best]


class BucketSampler(SeededSampler):
    """Training functions in buckets of similar size; `draw` gives (b,) example indices from one
    bucket (chosen with probability proportional to its size; without replacement when the
    bucket is large enough)."""

    def __init__(self, examples: list[Example], num_labels: int, bucket_size: int, seed: int) -> None:
        super().__init__(len(examples), seed, empty="no training functions; point data.path at more code or lower data.val_fraction")
        self.examples, self.num_labels = examples, num_labels
        order = sorted(range(len(examples)), key=lambda i: (examples[i].num_nodes, i))
        size = bucket_size if bucket_size > 0 else len(order)
        self.buckets = [torch.tensor(order[s : s + size]) for s in range(0, len(order), size)]
        if len(self.buckets) > 1 and len(self.buckets[-1]) < size // 2:  # fold a small last bucket in
            self.buckets[-2:] = [torch.cat(self.buckets[-2:])]
        self.weights = torch.tensor([float(len(b)) for b in self.buckets])

    def draw(self, batch: int) -> Tensor:
        members = self.buckets[int(torch.multinomial(self.weights, 1, generator=self.generator))]
        if len(members) >= batch:
            return members[torch.randperm(len(members), generator=self.generator)[:batch]]
        return members[torch.randint(0, len(members), (batch,), generator=self.generator)]

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        return collate([self.examples[i] for i in indices.tolist()], self.num_labels)


@TASKS.register("method_naming")
class MethodNaming(Task):
    """A function's name from its AST graph (or linearised AST), with an encoder."""

    architectures = ("encoder",)
    use_command = 'anyformer name-function RUN FILE.py'
    commands = ("name-function",)
    predict_input = "a Python source file (every def and async def in it is named, nested ones too)"
    predict_settings = {"top": Setting(int, 3, "also show the next most likely subtokens, up to this many in all"),
                        "skip_large": Setting(bool, False, "skip functions over the model's node limit instead of stopping")}
    reads_seq_len = False  # the graphs' sizes decide the lengths (up to model.max_seq_len)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.options = self.parse(cfg)
        self.mean_nodes = int(cfg.model.max_seq_len)
        self.vocab: CodeGraphVocab | None = None  # set by prepare

    @staticmethod
    def parse(cfg: Any) -> MethodNamingOptions:
        o = parse_options(MethodNamingOptions, cfg.task.options, "task.options (method_naming)")
        if o.min_count < 1 or o.name_min_count < 1:
            raise ConfigError(f"task.options.min_count and name_min_count must be >= 1, got {o.min_count} and {o.name_min_count}")
        if o.bucket_size < 0:
            raise ConfigError(f"task.options.bucket_size must be >= 0 (0: no buckets), got {o.bucket_size}")
        return o

    @classmethod
    def check(cls, cfg: Any) -> None:
        super().check(cfg)
        o = cls.parse(cfg)
        if cfg.model.head.kind not in ("none", "sequence_classification"):
            raise ConfigError("task 'method_naming' trains the 'sequence_classification' head (one logit per name subtoken); "
                              f"this run has model.head.kind={cfg.model.head.kind!r}")
        if cfg.data.corpus not in CORPORA:
            raise ConfigError(f"task 'method_naming' reads Python code: set data.corpus to 'stdlib' (this Python's standard "
                              f"library) or 'python' (the code at data.path); got {cfg.data.corpus!r}")
        if cfg.data.corpus == "python" and not cfg.data.path:
            raise ConfigError("data.corpus=python reads the folder (or .py file) at data.path; set data.path")
        if cfg.data.corpus == "stdlib" and cfg.data.path:
            raise ConfigError(f"data.corpus=stdlib reads this Python's standard library, not data.path={cfg.data.path!r}; "
                              "set data.corpus=python to read the code there, or remove data.path")
        reads_graph = getattr(POSITIONALS.get(cfg.model.positional.kind), "needs_graph", False)
        if o.input == "sequence" and reads_graph:
            raise ConfigError(f"task.options.input=sequence gives the model no graph, and positional kind "
                              f"{cfg.model.positional.kind!r} encodes one; choose another model.positional.kind (rope, "
                              "learned, ...) or input=graph")
        if o.input == "positions" and not reads_graph:
            raise ConfigError(f"task.options.input=positions gives the graph to the positional encoding only, and "
                              f"{cfg.model.positional.kind!r} does not read it (the model would see a bag of nodes); "
                              "choose model.positional.kind=magnetic, or input=graph or sequence")

    def prepare(self, env: Any) -> NamingData:
        d, o = self.cfg.data, self.options
        corpus = load_code_corpus(d.path if d.corpus == "python" else None, d.cache_dir, verbose=env.is_main)
        if not corpus.graphs:
            raise ValueError(f"no functions in the Python code under {corpus.root!r}; point data.path at code with functions")
        max_nodes = int(self.cfg.model.max_seq_len)
        kept = [g for g in corpus.graphs if g.num_nodes <= max_nodes]
        train_graphs = [g for g in kept if not held_out(g.module, d.val_fraction)]
        val_graphs = [g for g in kept if held_out(g.module, d.val_fraction)]
        if not train_graphs or not val_graphs:
            raise ValueError(f"the file split left {len(train_graphs)} training and {len(val_graphs)} held-out functions "
                             f"(of {len(kept)} within {max_nodes} nodes); change data.val_fraction or use more files")
        nodes = Counter(t for g in train_graphs for t in g.tokens)
        names = Counter(s for g in train_graphs for s in set(g.target))
        vocab = CodeGraphVocab.fit(nodes, names, len(train_graphs), min_count=o.min_count, name_min_count=o.name_min_count)
        if not vocab.names:
            raise ValueError(f"no name subtoken occurs task.options.name_min_count={o.name_min_count} times in the "
                             "training functions; lower it or use more code")
        train = [to_example(g, vocab) for g in train_graphs]
        val = sorted((to_example(g, vocab) for g in val_graphs), key=lambda e: (e.num_nodes, e.module, e.name))
        self.mean_nodes = max(1, round(sum(e.num_nodes for e in train) / len(train)))
        self.vocab = vocab
        return NamingData(vocab, train, val, corpus.root, corpus.files, corpus.failed, len(corpus.graphs) - len(kept),
                          max_nodes, frequency_baseline(train))

    def describe(self, data: NamingData) -> str:
        failed = f", {len(data.failed)} files did not parse" if data.failed else ""
        return (f"data {len(data.train):,} train / {len(data.val):,} held-out functions from {data.files} files under "
                f"{data.root}{failed}; {data.dropped:,} functions over {data.max_nodes} nodes dropped; "
                f"input {self.options.input}; {data.tokenizer.vocab_size:,} node tokens, {len(data.tokenizer.names):,} name subtokens")

    def model_config(self, model: ModelConfig, data: NamingData) -> ModelConfig:
        head = dataclasses.replace(model.head, kind="sequence_classification", num_labels=len(data.tokenizer.names))
        return dataclasses.replace(model, vocab_size=data.tokenizer.vocab_size, pad_token_id=data.tokenizer.pad_id, head=head)

    def tokens_per_example(self) -> int:
        return self.mean_nodes

    def sampler(self, data: NamingData, seed: int) -> BucketSampler:
        return BucketSampler(data.train, len(data.tokenizer.names), self.options.bucket_size, seed)

    def inspect_input(self, text: str, tokenizer: Any) -> tuple[Tensor, list[str] | None]:
        raise ValueError("inspect attention reads token sequences; a method_naming run reads code graphs (its attention "
                         "follows each graph's edges), which it does not show yet")

    def predict_inputs(self, model: nn.Module, tokenizer: Any, inputs: list[str], settings: dict[str, Any]) -> Iterator[str]:
        """Per function of each file: its line, true name, the predicted name and subtoken
        probabilities; then the mean subtoken F1 against the true names."""
        if not isinstance(tokenizer, CodeGraphVocab):
            raise ValueError("this run has no code-graph vocabulary (tokenizer.json); it was not written by the method_naming task")
        limit, device = self.cfg.model.max_seq_len, next(model.parameters()).device
        dtype = DTYPES[self.cfg.train.dtype]
        f1s = []
        for name in inputs:
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"no Python file at {str(path)!r}")
            try:
                graphs = source_graphs(path.read_bytes(), path.name)
            except (SyntaxError, ValueError) as e:
                raise ValueError(f"{path} does not parse as Python: {e}") from None
            if not graphs:
                raise ValueError(f"{path} has no functions (def or async def) with a name to predict; nothing to name")
            large = [g for g in graphs if g.num_nodes > limit]
            if large and not settings["skip_large"]:
                listed = ", ".join(f"{g.name} (line {g.lineno}, {g.num_nodes} nodes)" for g in large[:5])
                raise ValueError(f"{len(large)} function(s) exceed the model's limit of {limit} nodes (model.max_seq_len): {listed}; "
                                 "split them, or skip them (--skip-large) to name the others")
            if len(inputs) > 1:
                yield f"== {path}"
            for g in graphs:
                if g.num_nodes > limit:
                    yield f"line {g.lineno:<5} {g.name:<28} skipped: {g.num_nodes} nodes > {limit}"
                    continue
                batch = tuple(a.to(device) for a in collate([to_example(g, tokenizer)], len(tokenizer.names)))
                with torch.no_grad():
                    logits = self.logits(model, batch, dtype, tokenizer)[0]
                probs = logits.sigmoid()
                predicted = predicted_sets(logits[None], tokenizer.names)[0]
                f1s.append(subtoken_scores(g.target, predicted)[2])
                shown = probs.argsort(descending=True)[: max(settings["top"], len(predicted))].tolist()
                detail = " ".join(f"{tokenizer.names[i]}:{float(probs[i]):.2f}" for i in shown)
                yield f"line {g.lineno:<5} {g.name:<28} -> {'_'.join(predicted):<24} ({detail})"
        if f1s:
            yield f"{len(f1s)} functions named; mean subtoken F1 {sum(f1s) / len(f1s):.3f}"

    def logits(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype, vocab: CodeGraphVocab | None = None) -> Tensor:
        """(b, labels) fp32 logits of a collated batch (forward under autocast to `dtype`), the
        prior's log-odds added (`vocab`: the run's; default the prepared data's)."""
        tokens, keep, graph = batch[:3]
        with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(tokens, keep, **model_kwargs(self.options.input, keep, graph)).float()
        vocab = vocab or self.vocab
        if vocab is None:
            raise ValueError("the name vocabulary is unknown: call prepare() first, or pass the run's tokenizer as vocab")
        return out + prior_logits(vocab).to(out.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        logits = self.logits(model, batch, dtype)
        return F.binary_cross_entropy_with_logits(logits, batch[3], reduction="none").sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: NamingData, env: Any, batches: int | None = None) -> dict[str, float]:
        """Loss, subtoken precision / recall / F1 and exact matches over every held-out
        function (split across processes; `batches` is not used), beside the frequency
        baseline's scores."""
        t = self.cfg.train
        names = data.tokenizer.names
        rows = list(range(len(data.val)))[env.rank :: env.world]
        was_training = model.training
        model.eval()
        dtype = DTYPES[t.dtype]
        sums = torch.zeros(9, dtype=torch.float64, device=env.device)  # loss, p, r, f1, exact, base p, r, f1, count
        base = [subtoken_scores(e.target, data.baseline) for e in data.val]
        for part in split_evenly(rows, len(data.val), t.batch_size, env):
            if not part:  # fewer items than processes
                continue
            examples = [data.val[i] for i in part]
            batch = tuple(a.to(env.device) for a in collate(examples, len(names)))
            logits = self.logits(model, batch, dtype, data.tokenizer)
            sums[0] += F.binary_cross_entropy_with_logits(logits, batch[3], reduction="sum").double()
            for e, i, pred in zip(examples, part, predicted_sets(logits, names)):
                p, r, f1 = subtoken_scores(e.target, pred)
                sums[1:5] += torch.tensor([p, r, f1, float(set(pred) == set(e.target))], dtype=torch.float64)
                sums[5:8] += torch.tensor(base[i], dtype=torch.float64)
            sums[8] += len(examples)
        model.train(was_training)
        sums = mean_across(sums, env)
        s = (sums / sums[8]).tolist()
        keys = ("val_loss", "precision", "recall", "f1", "exact", "baseline_precision", "baseline_recall", "baseline_f1")
        return dict(zip(keys, s))
