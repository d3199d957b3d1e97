"""Tokenizers of a sequence-to-sequence task: a subword BPE over characters (SentencePiece
style: spaces become a marker, no pre-splitting, so Japanese or Chinese text without spaces
is fine) with special tokens, and the pair of a source and a target tokenizer saved as one
tokenizer.json (the same one twice when the vocabulary is shared).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import TOKENIZERS, BPETokenizer, Tokenizer, tokenizer_from_json

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
PAD, BOS, EOS, UNK = range(4)


def train_subword_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A character-level BPE of `vocab_size` tokens (the SPECIALS first) fitted to `texts`;
    characters it never saw encode as <unk>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token=SPECIALS[UNK]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


@TOKENIZERS.register("pair")
class PairTokenizer:
    """A source and a target tokenizer: `encode` is the source's, `decode` the target's."""

    kind = "pair"

    def __init__(self, source: Tokenizer, target: Tokenizer, shared: bool = False) -> None:
        self.source, self.target, self.shared = source, target, shared

    @property
    def vocab_size(self) -> int:
        return max(self.source.vocab_size, self.target.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.source.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.target.decode(ids)

    def to_json(self) -> dict[str, Any]:
        if self.shared:
            return {"kind": self.kind, "shared": self.source.to_json()}
        return {"kind": self.kind, "source": self.source.to_json(), "target": self.target.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PairTokenizer":
        if "shared" in data:
            tok = tokenizer_from_json(data["shared"])
            return cls(tok, tok, shared=True)
        return cls(tokenizer_from_json(data["source"]), tokenizer_from_json(data["target"]))
