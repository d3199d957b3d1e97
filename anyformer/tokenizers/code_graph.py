"""The vocabularies of the method-naming task (anyformer/tasks/method_naming.py): the node
tokens of code graphs (AST node types and identifier subtokens) and the name subtokens the
model predicts, saved together as a run's tokenizer.json.
"""

from __future__ import annotations

from typing import Any

from . import TOKENIZERS

PAD, UNK, FN = "<pad>", "<unk>", "<fn>"  # ids 0, 1, 2 of the node vocabulary
SPECIALS = (PAD, UNK, FN)


@TOKENIZERS.register("code_graph")
class CodeGraphVocab:
    """Node tokens -> ids (unknown ones -> <unk>), and the name-subtoken labels with their
    frequencies (the share of training functions whose name holds each).

    `encode` reads a whitespace-separated list of node tokens; `decode` turns label ids into a
    name (the subtokens joined by '_').
    """

    kind = "code_graph"

    def __init__(self, nodes: list[str], names: list[str], frequencies: list[float]) -> None:
        if tuple(nodes[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the node vocabulary must start with {SPECIALS}, got {nodes[:3]}")
        if len(frequencies) != len(names) or not all(0.0 < f < 1.0 for f in frequencies):
            raise ValueError(f"need one frequency in (0, 1) per name subtoken; got {len(frequencies)} for {len(names)} names")
        self.nodes, self.names, self.frequencies = list(nodes), list(names), [float(f) for f in frequencies]
        self.node_index = {t: i for i, t in enumerate(self.nodes)}
        self.name_index = {t: i for i, t in enumerate(self.names)}

    @classmethod
    def fit(cls, node_counts: dict[str, int], name_counts: dict[str, int], functions: int, *, min_count: int,
            name_min_count: int) -> "CodeGraphVocab":
        """Keep the node tokens seen at least `min_count` times and the name subtokens in at
        least `name_min_count` of the `functions` names (most frequent first, ties by text)."""
        def keep(counts: dict[str, int], least: int) -> list[str]:
            return [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= least and t not in SPECIALS]

        names = keep(name_counts, name_min_count)
        frequencies = [min(name_counts[t], functions - 0.5) / functions for t in names]
        return cls([*SPECIALS, *keep(node_counts, min_count)], names, frequencies)

    @property
    def vocab_size(self) -> int:
        return len(self.nodes)

    @property
    def pad_id(self) -> int:
        return 0

    def encode_nodes(self, tokens: list[str]) -> list[int]:
        """Node tokens -> ids; tokens outside the vocabulary become <unk>."""
        unk = self.node_index[UNK]
        return [self.node_index.get(t, unk) for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.encode_nodes(text.split())

    def decode(self, ids: list[int]) -> str:
        return "_".join(self.names[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "names": self.names, "frequencies": self.frequencies}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CodeGraphVocab":
        return cls(data["nodes"], data["names"], data["frequencies"])
