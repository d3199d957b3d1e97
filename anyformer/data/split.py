"""Held-out splits chosen by a hash of each item's name: independent of file order and of the
other items."""

from __future__ import annotations

import hashlib


def hash_fraction(name: str) -> float:
    """A number in [0, 1) fixed by `name` alone (from its SHA-1)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def held_out(name: str, fraction: float) -> bool:
    """Whether the item `name` is in the validation split (the share `fraction` of lowest hashes)."""
    return hash_fraction(name) < fraction
