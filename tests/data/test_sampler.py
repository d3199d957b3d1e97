"""anyformer/data/sampler.py: the one resumable sampler the tasks draw with. Draws follow the
seed, a saved state resumes the same draws, and a share of a draw builds the examples the whole
draw builds (what data-parallel processes rely on)."""

from __future__ import annotations

import pytest
import torch

from anyformer.data.sampler import SeededSampler


class Noisy(SeededSampler):
    """Example i is i plus noise drawn from the example's own generator."""

    def example(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (index + torch.rand(3, generator=generator),)


def test_draws_follow_the_seed_and_resume_from_a_saved_state() -> None:
    a, b = Noisy(50, seed=3), Noisy(50, seed=3)
    assert torch.equal(a.draw(8), b.draw(8))
    assert not torch.equal(Noisy(50, seed=4).draw(8), Noisy(50, seed=3).draw(8))
    state = a.state()
    after = a.draw(8)
    c = Noisy(50, seed=99)
    c.set_state(state)
    assert torch.equal(c.draw(8), after)
    rows = Noisy(5, seed=0).draw(1000)
    assert rows.shape == (1000, 2) and set(rows[:, 0].tolist()) == set(range(5))  # every index, none outside


def test_a_share_of_a_draw_builds_the_same_examples() -> None:
    s = Noisy(20, seed=1)
    rows = s.draw(6)
    (whole,) = s.batch(rows)
    (first,), (second,) = s.batch(rows[:3]), s.batch(rows[3:])
    assert torch.equal(torch.cat([first, second]), whole)
    assert torch.equal(whole.floor().long()[:, 0], rows[:, 0])  # example i comes from index i


def test_nothing_to_draw_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="no passages; add some"):
        Noisy(0, seed=0, empty="no passages; add some")
