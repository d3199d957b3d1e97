"""Sparsity patterns' block states (anyformer/nn/attention/patterns.py) for the patterns made of
tiles (local blocks, a block layout): "empty blocks cost nothing" needs their states to be
exact, not only conservative (tests/nn/attention/test_sparse.py checks conservative states
for every pattern): NONE for a block the dense mask leaves empty, FULL for one it fills, for
blocks aligned with the tiles and blocks that are not."""

from __future__ import annotations

import pytest
import torch

from anyformer.nn.attention.patterns import FULL, NONE, PARTIAL, BlockLayout, BlockLocal


def expected_state(block: torch.Tensor) -> int:
    return NONE if not block.any() else FULL if block.all() else PARTIAL


def assert_exact(pattern, n: int, m: int, spans: list[tuple[int, int]]) -> None:  # type: ignore[no-untyped-def]
    full = pattern.dense(n, m)
    seen = set()
    for bn, bm in spans:
        for q0 in range(0, n, bn):
            for k0 in range(0, m, bm):
                q1, k1 = min(q0 + bn, n), min(k0 + bm, m)
                want = expected_state(full[q0:q1, k0:k1])
                assert pattern.block_state(q0, q1, k0, k1) == want, (q0, q1, k0, k1)
                seen.add(want)
    assert seen == {NONE, FULL} or seen == {NONE, PARTIAL, FULL}, seen  # the check saw both kinds of whole block


def test_block_local_states_are_exact() -> None:
    assert_exact(BlockLocal(7), 56, 56, [(7, 7), (7, 14), (14, 7), (3, 3), (5, 9), (4, 2)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_layout_states_are_exact(seed: int) -> None:
    layout = torch.rand(6, 6, generator=torch.Generator().manual_seed(seed)) < 0.5
    layout[0, 0], layout[0, 1] = True, False
    assert_exact(BlockLayout(layout, 8), 48, 48, [(8, 8), (8, 16), (16, 8), (16, 16), (3, 5), (6, 6), (12, 4)])
