"""Tokenizers behind one small interface: encode, decode, vocab_size, save/load as JSON.

Kinds: "char" (one id per distinct character of the training text), "byte" (the 256 byte
values of UTF-8), "bpe" (byte-level BPE trained with the `tokenizers` package) and, in their
own files, "pair" (a sequence-to-sequence task's source and target tokenizers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from ..config import ConfigError
from ..registry import Registry, RegistryError


class Tokenizer(Protocol):
    """Text <-> token ids."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids."""

    def encode(self, text: str) -> list[int]:
        """Text -> ids; raises ValueError for text the vocabulary cannot represent."""

    def decode(self, ids: list[int]) -> str:
        """Ids -> text."""

    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as a JSON-ready mapping."""


TOKENIZERS: Registry[Any] = Registry("tokenizer")


@TOKENIZERS.register("char")
class CharTokenizer:
    """Character-level vocabulary: the sorted distinct characters of the training text."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> "CharTokenizer":
        """The vocabulary of `text` (vocab_size is ignored: every character gets an id)."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self.index})
            raise ValueError(
                f"characters {''.join(bad)!r} are not in this character vocabulary of "
                f"{self.vocab_size} characters; remove them from the text"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    def to_hf(self) -> str:
        """This vocabulary as a Hugging Face `tokenizers` JSON (tokenizer.json): every character
        its own token, with the same ids; decoding concatenates them."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.WordLevel(dict(self.index), unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok.to_str()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CharTokenizer":
        return cls(data["chars"])


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: any text is representable."""

    kind = "byte"

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> "ByteTokenizer":
        """Nothing to learn; returns the tokenizer."""
        return cls()

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def to_hf(self) -> str:
        """The UTF-8 bytes as a Hugging Face `tokenizers` JSON (tokenizer.json): byte b is token b,
        through the byte-level alphabet (GPT-2's byte-to-character table)."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        alphabet = _byte_alphabet()
        tok = HFTokenizer(models.WordLevel({alphabet[b]: b for b in range(256)}, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ByteTokenizer":
        return cls()


@TOKENIZERS.register("bpe")
class BPETokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant), trained and run by
    the `tokenizers` package."""

    kind = "bpe"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> "BPETokenizer":
        """Train a byte-level BPE of `vocab_size` (default 2000) tokens on `text`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size or 2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        chunk = 1 << 16
        tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self.backend.to_str())}

    def to_hf(self) -> str:
        """The trained `tokenizers` BPE itself (tokenizer.json)."""
        return self.backend.to_str()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(data["tokenizer"])))


def _byte_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte (GPT-2's table): printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_tokenizer_files(tok: Any) -> dict[str, str]:
    """The files of a Hugging Face tokenizer equal to `tok` (tokenizer.json, tokenizer_config.json),
    by name; a tokenizer with no such equivalent (one without `to_hf`) raises ValueError naming it."""
    to_hf = getattr(tok, "to_hf", None)
    if not callable(to_hf):
        raise ValueError(f"the {getattr(tok, 'kind', type(tok).__name__)!r} tokenizer has no Hugging Face equivalent; "
                         "only char, byte and bpe tokenizers convert")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": to_hf(), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of registered `kind` fitted to `text`."""
    try:
        cls = TOKENIZERS.get(kind)
    except RegistryError as e:  # the message lists the valid kinds
        raise ConfigError(str(e)) from None
    return cls.train(text, vocab_size)


def tokenizer_from_json(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError("tokenizer JSON must be a mapping with a 'kind' key")
    try:
        return TOKENIZERS.get(data["kind"]).from_json(data)
    except (RegistryError, KeyError, TypeError) as e:
        raise ValueError(f"tokenizer JSON is not usable: {e}") from None


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write a tokenizer as JSON."""
    Path(path).write_text(json.dumps(tok.to_json()))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by save_tokenizer."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid tokenizer JSON ({e}); the file may be truncated") from None
    return tokenizer_from_json(data)


from ..registry import discover  # noqa: E402  (variant files register themselves: pair.py, ...)

discover(__name__, __path__)

__all__ = [
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "TOKENIZERS", "Tokenizer", "hf_tokenizer_files",
    "load_tokenizer", "save_tokenizer", "tokenizer_from_json", "train_tokenizer",
]
