"""The hand-written looped adder (anyformer/convert/looped_adder.py) against Python's integers:
exact for numbers far longer than the 8 bits it was written for, once the loops cover the
longest carry chain; with fewer loops, equal to the carry-save iteration run for that many
steps in Python (so the loop count is the work done); extra loops change nothing."""

from __future__ import annotations

import random

import pytest

from anyformer.convert.looped_adder import add, adder_tokens, build_adder


def carry_save(a: int, b: int, steps: int) -> int:
    """The sum bits after `steps` rounds of s, c = s xor 2c, s and 2c from s = a xor b, c = a and b."""
    s, c = a ^ b, a & b
    for _ in range(steps):
        s, c = s ^ (c << 1), s & (c << 1)
    return s


@pytest.mark.parametrize("bits, loops", [(8, 9), (40, 41), (400, 401)])
def test_enough_loops_add_exactly_at_lengths_beyond_those_written_for(bits: int, loops: int) -> None:
    model = build_adder(loops)
    rng = random.Random(bits)
    pairs = [(rng.getrandbits(bits), rng.getrandbits(bits)) for _ in range(12 if bits < 100 else 3)]
    pairs += [(2**bits - 1, 1), (2**bits - 1, 2**bits - 1), (0, 0), (2**bits - 1, 0)]  # the longest carry chains, none
    for a, b in pairs:
        assert add(model, a, b) == a + b, (a, b)


@pytest.mark.parametrize("loops", [1, 2, 5, 11])
def test_each_loop_is_one_carry_step(loops: int) -> None:
    model = build_adder(loops)
    rng = random.Random(loops)
    for _ in range(20):
        a, b = rng.getrandbits(32), rng.getrandbits(32)
        assert add(model, a, b) == carry_save(a, b, loops), (a, b, loops)
    a, b = 2**32 - 1, 1  # the carry has moved `loops` digits: not yet done
    assert add(model, a, b) == carry_save(a, b, loops) != a + b


def test_loops_past_the_longest_carry_chain_change_nothing() -> None:
    a, b = 2**20 - 1, 1
    for loops in (21, 22, 63):
        assert add(build_adder(loops), a, b) == a + b


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        adder_tokens(-1, 2)
    with pytest.raises(ValueError, match=r"512 \+ 1 needs 12 positions; build the adder with max_seq_len >= 12"):
        add(build_adder(3, max_seq_len=8), 2**9, 1)
    with pytest.raises(ValueError, match="loops must be at least 1"):
        build_adder(0)
