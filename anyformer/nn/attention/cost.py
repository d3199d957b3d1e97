"""What a sequence mixer costs, as it declares it: FLOPs per query token of the mixing (the work
beyond multiplying by its weights, which the model summary counts from the parameters), for a
forward over a sequence and for one decoding step, so that budgets, `info` and comparisons
take any mixer, softmax or not.

A mixer module declares `mixing_flops(queries, keys, *, causal) -> float` and
`step_flops(cached) -> float`; softmax attention's cost follows the keys each query attends
to (`keys_per_query` of its kernel or pattern), a kernelized or recurrent mixer's does not
grow with the length. A module that declares nothing is costed as full softmax attention over
its heads (`num_heads` x `head_dim`).
"""

from __future__ import annotations

from typing import Any


def full_keys(queries: int, keys: int, causal: bool) -> float:
    """Keys per query of full attention: all `keys`, half of them under a causal mask (the
    convention of Kaplan et al. 2020 for a sequence attending to itself)."""
    return keys / 2 if causal else float(keys)


def softmax_flops(num_heads: int, head_dim: int, keys: float) -> float:
    """Scores (q . k) and mixing (p . v) of `keys` keys for one query: 2 x 2 x h x d each."""
    return 4.0 * num_heads * head_dim * keys


def mixing_flops(module: Any, queries: int, keys: int, *, causal: bool) -> float:
    """The mixing FLOPs per query token of an attention module (its own declaration, or full
    softmax attention over its heads)."""
    own = getattr(module, "mixing_flops", None)
    if callable(own):
        return float(own(queries, keys, causal=causal))
    return softmax_flops(module.num_heads, module.head_dim, full_keys(queries, keys, causal))


def step_flops(module: Any, cached: int) -> float:
    """The mixing FLOPs of one decoding step that reads `cached` earlier tokens plus itself."""
    own = getattr(module, "step_flops", None)
    if callable(own):
        return float(own(cached))
    return mixing_flops(module, 1, cached + 1, causal=False)
