"""Protein sequences: FASTA reading and the ESM amino-acid tokenizer (the held-out split is
by a hash of each id, data/split.py).

The corpus `proteins` is the 2,100 bacterial proteins shipped in `pyhmmer`'s test data
(`pip install pyhmmer==0.12.3`); any FASTA file works through `data.path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tokenizers import TOKENIZERS

PYHMMER_PROTEINS = "tests/data/seqs/938293.PRJEB85.HG003687.faa"

# ESM-1b / ESM-2 alphabet, in its order: specials, the residues by frequency, rare and gap symbols
ESM_TOKENS = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
STANDARD = "ACDEFGHIKLMNPQRSTVWY"  # the 20 amino acids (random replacements of BERT-style masking)


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(id, sequence) of every record of a FASTA file; the id is the header's first word, a
    trailing stop '*' is dropped and the sequence upper-cased."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"FASTA file {str(p)!r} does not exist")
    records: list[tuple[str, str]] = []
    name, parts = None, []
    for line in p.read_text().splitlines():
        if line.startswith(">"):
            if name is not None:
                records.append((name, "".join(parts).rstrip("*").upper()))
            name, parts = (line[1:].split() or [""])[0], []
        elif line.strip():
            if name is None:
                raise ValueError(f"{p} is not FASTA: sequence data before the first '>' header")
            parts.append(line.strip())
    if name is not None:
        records.append((name, "".join(parts).rstrip("*").upper()))
    if not records:
        raise ValueError(f"{p} holds no FASTA records")
    return records


def packaged_proteins() -> Path:
    """The pyhmmer test-data FASTA file, or a clear error saying how to install it."""
    try:
        import pyhmmer
    except ImportError:
        raise FileNotFoundError(
            "the 'proteins' corpus ships in pyhmmer's test data: pip install pyhmmer==0.12.3 "
            "(or give any FASTA file as data.path)"
        ) from None
    path = Path(pyhmmer.__file__).parent / PYHMMER_PROTEINS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed pyhmmer; install pyhmmer==0.12.3")
    return path


@TOKENIZERS.register("protein")
class ProteinTokenizer:
    """The ESM amino-acid vocabulary: one id per residue letter, plus <cls>, <pad>, <eos>,
    <unk> and <mask>. `encode` maps letters (unknown ones to <unk>); `decode` gives letters
    (special tokens in angle brackets)."""

    kind = "protein"

    def __init__(self, tokens: list[str] | None = None) -> None:
        self.tokens = list(tokens or ESM_TOKENS)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.cls_id, self.pad_id, self.eos_id = self.index["<cls>"], self.index["<pad>"], self.index["<eos>"]
        self.unk_id, self.mask_id = self.index["<unk>"], self.index["<mask>"]
        self.standard_ids = [self.index[c] for c in STANDARD]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Residue letters -> ids; `<mask>` (and the other bracketed specials) may appear in the text."""
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                special = text[i : end + 1] if end > 0 else ""
                if special not in self.index:
                    raise ValueError(f"unknown special token {special or text[i:]!r}; known: <cls>, <pad>, <eos>, <unk>, <mask>")
                ids.append(self.index[special])
                i = end + 1
                continue
            if not text[i].isspace():
                ids.append(self.index.get(text[i].upper(), self.unk_id))
            i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProteinTokenizer":
        return cls(data["tokens"])
