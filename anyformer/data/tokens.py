"""Token files on disk and random-window batches.

A corpus is tokenized once into `train.bin` / `val.bin` (numpy memmaps) in a cache folder
named by a hash of the text and the tokenizer settings; a second run with the same data
reuses them without re-tokenizing.

Legend: `b` batch, `n` window length.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..tokenizers import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from .sampler import SeededSampler
from .text import Document, load_corpus, split_documents

DOC_SEPARATOR = "\n\n"
CACHE_VERSION = "2"  # bump when the tokenization of a corpus changes


def default_cache_dir() -> Path:
    """$ANYFORMER_CACHE, or ~/.cache/anyformer/data."""
    return Path(os.environ.get("ANYFORMER_CACHE", Path.home() / ".cache" / "anyformer" / "data"))


def _join(docs: list[Document]) -> str:
    return DOC_SEPARATOR.join(text for _, text in docs)


def _write_tokens(path: Path, ids: list[int], vocab_size: int) -> None:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(arr.tobytes())
    os.replace(tmp, path)


@dataclass
class TokenData:
    """A tokenized corpus: tokenizer, train/val token arrays (memmaps) and the cache folder."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    folder: Path
    cached: bool
    val_names: list[str]


def prepare_tokens(
    corpus: str,
    *,
    path: str | None = None,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
) -> TokenData:
    """Read, split, tokenize and cache a corpus; reuse the cache when the inputs are unchanged."""
    docs = load_corpus(corpus, path)
    train_docs, val_docs = split_documents(docs, val_fraction)
    train_text, val_text = _join(train_docs), _join(val_docs)
    h = hashlib.sha256()
    for part in (CACHE_VERSION, tokenizer, str(vocab_size), train_text, "\0val\0", val_text):
        h.update(part.encode("utf-8"))
    folder = Path(cache_dir or default_cache_dir()).expanduser() / f"{corpus}-{tokenizer}-{h.hexdigest()[:16]}"
    meta_path = folder / "meta.json"
    cached = meta_path.is_file()
    if cached:
        tok = load_tokenizer(folder / "tokenizer.json")
        meta = json.loads(meta_path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        # a character vocabulary is the character set of all the text (else a letter seen only in
        # validation could not be encoded); learned merges (BPE) come from the training text only
        fit_text = train_text + val_text if tokenizer == "char" else train_text
        tok = train_tokenizer(tokenizer, fit_text, vocab_size)
        _write_tokens(folder / "train.bin", tok.encode(train_text), tok.vocab_size)
        _write_tokens(folder / "val.bin", tok.encode(val_text), tok.vocab_size)
        save_tokenizer(tok, folder / "tokenizer.json")
        meta = {"dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32", "vocab_size": tok.vocab_size,
                "val_documents": [n for n, _ in val_docs], "train_chars": len(train_text), "val_chars": len(val_text)}
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)  # written last: its presence marks a complete cache
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return TokenData(tok, train, val, folder, cached, meta["val_documents"])


class WindowSampler(SeededSampler):
    """Random windows of `seq_len + 1` tokens from a token array: inputs and next-token targets.

    The windows' starts come from the SeededSampler's generator, whose state can be saved and
    restored, so the data order resumes exactly (a window needs no seed of its own).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int = 0) -> None:
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"only {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                "use a shorter train.seq_len or more data"
            )
        super().__init__(len(tokens) - seq_len - 1, seed)
        self.tokens = tokens
        self.seq_len = seq_len
        self._offsets = np.arange(seq_len + 1)

    def starts(self, batch: int) -> Tensor:
        """(b,) random start positions, advancing the generator."""
        return torch.randint(0, self.size, (batch,), generator=self.generator)

    def draw(self, batch: int) -> Tensor:
        return self.starts(batch)

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        return self.windows(indices)

    def windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets, each (b, n) int64, for the windows beginning at `starts` (b,)."""
        idx = starts.numpy()[:, None] + self._offsets  # (b, n + 1)
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (b, n + 1)
        return w[:, :-1], w[:, 1:]
