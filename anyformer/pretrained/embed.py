"""Sentence embeddings from a pretrained encoder (Sentence-BERT style: pool the token states, normalise).

A sentence-transformers directory says how to pool in `1_Pooling/config.json`, whether to
L2-normalise in `modules.json` (a `Normalize` module), and how long an input may be and whether
to lower-case it in `sentence_bert_config.json` (`max_seq_length`, `do_lower_case`; 256 for
all-MiniLM-L6-v2, shorter than the model's 512 positions); `sentence_pooling` reads all three,
so embeddings match sentence-transformers' for long inputs too.

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
    L2-normalised or not, from at most `max_len` tokens, special tokens included (None: the
    tokenizer's or the model's limit), the text lower-cased first when `lower_case`."""

    pooling: str = "mean"
    normalize: bool = True
    max_len: int | None = None
    lower_case: bool = False


def _transformer_config(root: Path, modules: list[dict]) -> dict:
    """The Transformer module's sentence_bert_config.json (in its folder, else the root), or {}."""
    folders = [m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")]
    for folder in [*folders, ""]:
        file = root / folder / "sentence_bert_config.json"
        if file.is_file():
            return json.loads(file.read_text())
    return {}


def sentence_pooling(path: str | Path) -> SentencePooling:
    """The pooling, normalisation, max length and lower-casing of a sentence-transformers model
    directory (mean + normalise, no length limit of its own, no lower-casing when it says nothing)."""
    root = Path(path)
    out = SentencePooling()
    modules_file = root / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    bert = _transformer_config(root, modules)
    max_len = bert.get("max_seq_length")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        raise ConfigError(f"sentence_bert_config.json in {root}: max_seq_length must be a positive integer, got {max_len!r}")
    out.max_len = max_len
    out.lower_case = bool(bert.get("do_lower_case", False))
    if not modules:
        return out
    out.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            conf = json.loads((root / m.get("path", "1_Pooling") / "config.json").read_text())
            modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token") for k, v in conf.items() if k.startswith("pooling_mode_") and v]
            if modes not in (["mean"], ["cls"]):
                raise ConfigError(f"sentence pooling {modes} in {root} is not supported; supported: mean, cls (one of them)")
            out.pooling = modes[0]
    return out


def max_tokens(model: nn.Module, tokenizer: PretrainedTokenizer, pooling: SentencePooling) -> int:
    """The most tokens (special ones included) a sentence keeps: the sentence-transformers
    max_seq_length when given, else the tokenizer's model_max_length, never past the model's
    max_seq_len."""
    limit = model.config.max_seq_len  # type: ignore[attr-defined]
    return min(pooling.max_len or tokenizer.max_len or limit, limit)


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

    model: an anyformer EncoderModel; tokenizer: its tokenizer. Each sentence is lower-cased
    when pooling.lower_case, then cut to `max_tokens(...)` tokens the way transformers'
    tokenizers truncate (the text is cut, [CLS] ... [SEP] stay), as sentence-transformers does.
    """
    if not hasattr(model, "embed_sentences"):
        raise ValueError(f"sentence embeddings need an encoder model (BERT-like), got {type(model).__name__}")
    if isinstance(sentences, str) or not sentences:
        raise ValueError("give a non-empty list of sentences")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pooling = pooling or SentencePooling()
    device = next(model.parameters()).device
    limit = max_tokens(model, tokenizer, pooling)
    texts = [s.lower() for s in sentences] if pooling.lower_case else list(sentences)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens, mask = tokenizer.encode_batch(texts[i : i + batch_size], max_len=limit, device=device)  # (b, n)
        out.append(model.embed_sentences(tokens, mask, pooling=pooling.pooling, normalize=pooling.normalize).float())
    return torch.cat(out)  # (b, d)
