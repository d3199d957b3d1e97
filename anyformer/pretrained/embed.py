"""Sentence embeddings from a pretrained encoder (Sentence-BERT style: pool the token states, normalise).

A sentence-transformers directory says how to pool in `1_Pooling/config.json` and whether to
L2-normalise in `modules.json` (a `Normalize` module); `sentence_pooling` reads both.

Legend: `b` batch, `n` length, `d` width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .tokenizer import PretrainedTokenizer


@dataclass
class SentencePooling:
    """How token states become one sentence vector: "mean" over real tokens or the first ("cls"),
    L2-normalised or not, from at most `max_len` tokens (None: the model's limit)."""

    pooling: str = "mean"
    normalize: bool = True
    max_len: int | None = None


def sentence_pooling(path: str | Path) -> SentencePooling:
    """The pooling of a sentence-transformers model directory (mean + normalise when it says nothing)."""
    root = Path(path)
    out = SentencePooling()
    if (root / "sentence_bert_config.json").is_file():
        out.max_len = json.loads((root / "sentence_bert_config.json").read_text()).get("max_seq_length")
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return out
    modules = json.loads(modules_file.read_text())
    out.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            conf = json.loads((root / m.get("path", "1_Pooling") / "config.json").read_text())
            modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token") for k, v in conf.items() if k.startswith("pooling_mode_") and v]
            if modes not in (["mean"], ["cls"]):
                raise ConfigError(f"sentence pooling {modes} in {root} is not supported; supported: mean, cls (one of them)")
            out.pooling = modes[0]
    return out


@torch.no_grad()
def embed_sentences(
    model: nn.Module,
    tokenizer: PretrainedTokenizer,
    sentences: Sequence[str],
    *,
    pooling: SentencePooling | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Sentence embeddings (b, d) of `sentences`, in batches of `batch_size` (padding does not change them).

    model: an anyformer EncoderModel; tokenizer: its tokenizer (sequences are truncated to its max_len).
    """
    if not hasattr(model, "embed_sentences"):
        raise ValueError(f"sentence embeddings need an encoder model (BERT-like), got {type(model).__name__}")
    if isinstance(sentences, str) or not sentences:
        raise ValueError("give a non-empty list of sentences")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pooling = pooling or SentencePooling()
    device = next(model.parameters()).device
    limit = min(pooling.max_len or tokenizer.max_len or model.config.max_seq_len, model.config.max_seq_len)
    out = []
    for i in range(0, len(sentences), batch_size):
        tokens, mask = tokenizer.encode_batch(list(sentences[i : i + batch_size]), max_len=limit, device=device)  # (b, n)
        out.append(model.embed_sentences(tokens, mask, pooling=pooling.pooling, normalize=pooling.normalize).float())
    return torch.cat(out)  # (b, d)
