"""Binary addition written by hand into the weights of one looped block: each loop moves every
pending carry one digit on, so `loops` sets how long a carry chain is resolved (a looped
Transformer as a program, Giannou et al. 2023).

The input is two numbers a and b as digit pairs, least significant first, after a BOS token:
token 1 + a_i + 2 b_i at position i + 1, with one more (0, 0) pair than the longer number has
digits so the last carry has a place. The residual stream holds, per position,

    s (sum bit)  c (carry out)  f (carry fetched from the digit before)  bos  one

The embedding starts the carry-save iteration: s = a_i xor b_i, c = a_i and b_i. Each loop,
the block (norm-free: `norm: none`) does one step of it:

- attention fetches the carry of the digit before: a Shaw relative-position key embedding at
  distance -1 only (`max_distance: 2`, so every farther key shares another, zero, row), read by
  a constant query of size `sharpness`; the keys' own projection is zero, so the softmax puts
  1 - (n - 1) e^-sharpness of its weight on position i - 1 whatever the length, and the value
  carried is c;
- the ReLU MLP computes OR and AND of s and f with two ramps each, steep enough that a fetched
  carry off by less than 0.25 still gives exact 0/1 answers, and writes s <- s xor f,
  c <- s and f, f <- 0 (the BOS position is held at zero by a -10 bos term).

The invariant s + 2c = a + b (over the whole number) holds after every loop, and c is zero
after as many loops as the longest carry chain; later loops change nothing. The weights do not
depend on the length: the model adds numbers of any length, given enough loops (and a
max_seq_len that fits them: Shaw positions have no table of absolute positions).

Legend: `n` positions (BOS included), `d` = 5 residual directions.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

S, C, F, BOS, ONE = range(5)  # residual directions


def adder_config(loops: int, max_seq_len: int = 4096) -> ModelConfig:
    """The looped encoder the adder's weights fit: one block applied `loops` times."""
    if loops < 1:
        raise ValueError(f"loops must be at least 1, got {loops}")
    return ModelConfig(
        arch="encoder", vocab_size=5, dim=5, num_layers=1, max_seq_len=max_seq_len,
        attention={"num_heads": 1, "head_dim": 2, "kernel": "eager", "scale": 1.0},
        positional={"kind": "shaw", "options": {"max_distance": 2, "values": False}},
        norm={"kind": "none"}, ffn={"kind": "mlp", "activation": "relu", "hidden_dim": 7},
        depth={"kind": "looped", "options": {"loops": loops}},
        head={"kind": "token_classification", "num_labels": 2}, tie_embeddings=False, final_norm=False,
    )


def adder_weights(sharpness: float = 40.0) -> dict[str, torch.Tensor]:
    """The state dict of the adder (for `adder_config`'s model; any loop count)."""
    emb = torch.zeros(5, 5)
    emb[0, BOS] = emb[0, ONE] = 1.0
    for a in (0, 1):
        for b in (0, 1):
            t = 1 + a + 2 * b
            emb[t, S], emb[t, C], emb[t, ONE] = a ^ b, a & b, 1.0
    q, k, v, o = torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(5, 2)
    q[0, ONE] = sharpness  # a constant query; keys add nothing, the distance embedding decides
    v[0, C] = 1.0  # the carry, written to f
    o[F, 0] = 1.0
    rel = torch.zeros(5, 2)  # rows: distance -2 (and beyond), -1, 0, 1, 2 (and beyond)
    rel[1, 0] = 1.0  # distance -1: the digit before
    up = torch.zeros(7, 5)
    for h, threshold in enumerate((0.5, 1.5, 2.5, 3.5)):  # ramps of 2(s + f): OR = h0 - h1, AND = h2 - h3
        up[h, S], up[h, F], up[h, ONE], up[h, BOS] = 2.0, 2.0, -threshold, -10.0
    up[4, S], up[5, C], up[6, F] = 1.0, 1.0, 1.0  # s, c and f themselves (all >= 0)
    down = torch.zeros(5, 7)
    down[S] = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 0.0, 0.0])  # s <- OR - AND
    down[C] = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, -1.0, 0.0])  # c <- AND
    down[F] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # f <- 0
    head = torch.zeros(2, 5)
    head[1, S] = 1.0  # logits (0.5, s): the sum bit
    return {
        "embed.tokens.weight": emb, "positional.keys": rel,
        "stack.blocks.0.attn.sublayer.q_proj.weight": q, "stack.blocks.0.attn.sublayer.k_proj.weight": k,
        "stack.blocks.0.attn.sublayer.v_proj.weight": v, "stack.blocks.0.attn.sublayer.o_proj.weight": o,
        "stack.blocks.0.ffn.sublayer.up.weight": up, "stack.blocks.0.ffn.sublayer.down.weight": down,
        "head.classifier.weight": head, "head.classifier.bias": torch.tensor([0.5, 0.0]),
    }


def build_adder(loops: int, max_seq_len: int = 4096) -> torch.nn.Module:
    """The adder as an anyformer model (eval mode)."""
    from ..models.builders import build_model

    model = build_model(adder_config(loops, max_seq_len))
    model.load_state_dict(adder_weights())
    return model.eval()


def adder_tokens(a: int, b: int) -> torch.Tensor:
    """(1, n) tokens of a + b: BOS, then digit pairs least significant first, one pair more than
    the longer number has binary digits."""
    if a < 0 or b < 0:
        raise ValueError(f"the adder adds non-negative integers, got {a} and {b}")
    digits = max(a.bit_length(), b.bit_length(), 1) + 1
    return torch.tensor([[0] + [1 + ((a >> i) & 1) + 2 * ((b >> i) & 1) for i in range(digits)]])


@torch.no_grad()
def add(model: torch.nn.Module, a: int, b: int) -> int:
    """a + b as the model computes it (exact when its loops cover the longest carry chain)."""
    tokens = adder_tokens(a, b).to(next(model.parameters()).device)
    if tokens.shape[1] > model.config.max_seq_len:
        raise ValueError(f"{a} + {b} needs {tokens.shape[1]} positions; build the adder with max_seq_len >= {tokens.shape[1]}")
    bits = model(tokens)[0, 1:].argmax(-1).tolist()  # (n - 1,), least significant first
    return sum(bit << i for i, bit in enumerate(bits))
