"""The one resumable random sampler every task's training data is drawn with."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor


class SeededSampler:
    """Examples in a resumable random order.

    One torch.Generator, seeded once, makes every random choice of the draws; its state is
    what checkpoints save (`state` / `set_state`), so a resumed run draws the same examples.
    `draw(b)` gives (b, 2) rows of (example index, example seed); `batch(rows)` builds each
    example from its own seed (`example(index, generator)`) and joins them (`collate`), so a
    process's share of a draw builds the same examples wherever it runs. A sampler with another
    order (by length, in buckets, windows) overrides `draw` and `batch` and keeps the rest.

    Args:
        size: how many examples there are to draw from (at least one).
        seed: the generator's seed.
        empty: what to tell the user when there are none.
    """

    def __init__(self, size: int, seed: int, *, empty: str = "no examples to draw from") -> None:
        if size < 1:
            raise ValueError(empty)
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch: int) -> Tensor:
        """(b, 2) rows of (example index, example seed) of the next global batch."""
        idx = torch.randint(0, self.size, (batch,), generator=self.generator)
        return torch.stack([idx, torch.randint(0, 2**62, (batch,), generator=self.generator)], 1)

    @staticmethod
    def seeded(rows: Tensor) -> Iterator[tuple[int, torch.Generator]]:
        """(example index, a generator seeded with its row's seed) for each row of a draw."""
        for index, seed in rows[:, :2].tolist():
            yield int(index), torch.Generator().manual_seed(int(seed))

    def batch(self, rows: Tensor) -> tuple[Tensor, ...]:
        """The tensors of the examples of `rows` (a process's share of a draw)."""
        return self.collate([self.example(index, g) for index, g in self.seeded(rows)])

    def example(self, index: int, generator: torch.Generator) -> tuple[Any, ...]:
        """One example, its random choices (crops, masks, augmentation) made with `generator`."""
        raise NotImplementedError

    def collate(self, examples: list[tuple[Any, ...]]) -> tuple[Tensor, ...]:
        """The examples as batch tensors: each field stacked (override for padding)."""
        return tuple(torch.stack(list(field)) for field in zip(*examples))

    def state(self) -> Tensor:
        """The generator state (uint8 tensor), for checkpoints."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Restore a state from `state()`."""
        self.generator.set_state(state)
