"""A decoder-only model's whole batch-1 decoding step in one C++ call (CPU, fp32 or bf16).

At batch 1 a step's arithmetic is a few dozen matrix-vector products; run module by module
from Python it also pays ~25 Python calls and ~30 small PyTorch dispatches per block, a few
milliseconds per token for a 12-block model, as much as a fifth of the step. `NativeStep` hands
every block, the final norm and the LM head to `Decoder` (cpu_decode.cpp), which computes what
the modules compute, with the same ATen functions in the same order and dtypes plus the
library's GEMV and one-query attention kernels, so logits equal those of the Python step with
`FastLinears` bit for bit. Python keeps the token embedding, positions and cache bookkeeping.

It applies to the common decoder shape and declines (`why_not` says why) anything else, which
then decodes through the module path: pre-norm blocks of exact multi-head attention (MHA, GQA,
MQA; no QK-norm, no sparsity pattern), LayerNorm or RMSNorm, MLP or gated feed-forward, input
positions (learned, sinusoidal, none) or RoPE, a plain preallocated float32 cache, batch 1
without padding.

Legend: `d` model width, `V` vocabulary, `r` rotary channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.attention.chunked import ChunkedKernel
from ..nn.attention.kernels import eager_attention, sdpa_attention
from ..nn.attention.mha import MultiHeadAttention
from ..nn.block import PreNorm, TransformerBlock
from ..nn.feedforward import ACTIVATIONS, MLP, GatedFeedForward
from ..nn.kv_cache import KVCache, ModelCache
from ..nn.norm import LayerNorm, RMSNorm
from ..nn.positional import PositionalEncoding
from ..nn.positional.rope import RoPE, rope_angles
from ..native import decode_kernels as native_gemv
from .common import Stack

_ACTIVATION_INDEX = {fn: i for i, fn in enumerate(ACTIVATIONS[name] for name in ("gelu", "gelu_tanh", "relu", "silu"))}
_EMPTY = torch.empty(0)


def _norm(norm: nn.Module, dtype: torch.dtype) -> tuple[list[Tensor], list[float]] | str:
    """(weight, bias) and (kind, eps) of a norm for the C++ step, or why it cannot run there."""
    if isinstance(norm, nn.Identity):
        return [_EMPTY, _EMPTY], [0.0, 0.0]
    if type(norm) is LayerNorm:
        if norm.weight.dtype != dtype:
            return "a LayerNorm's weights are not in the model's dtype"
        return [norm.weight, _EMPTY if norm.bias is None else norm.bias], [1.0, norm.eps]
    if type(norm) is RMSNorm:
        return [norm.weight, _EMPTY], [2.0, norm.eps]
    return f"norm {type(norm).__name__} is not LayerNorm or RMSNorm"


def _full_attention(attn: nn.Module) -> bool:
    kernel = getattr(attn, "kernel", None)
    exact = kernel is eager_attention or kernel is sdpa_attention or (isinstance(kernel, ChunkedKernel) and kernel.pattern is None)
    # an `attend` set on the instance (e.g. anyformer.longcontext's LM-Infinite) is not the class's attention
    return (type(attn) is MultiHeadAttention and exact and "attend" not in vars(attn) and isinstance(attn.q_norm, nn.Identity)
            and isinstance(attn.k_norm, nn.Identity))


def _input_positions_only(positional: PositionalEncoding) -> bool:
    """True when the encoding acts only on the input embeddings (learned, sinusoidal, none)."""
    cls = type(positional)
    return cls.rotate is PositionalEncoding.rotate and cls.bias is PositionalEncoding.bias


def _block(block: nn.Module, dtype: torch.dtype) -> tuple[list[Tensor], list[float], int] | str:
    """The block's 18 tensors (no caches yet), its norms' meta and its activation index."""
    if type(block) is not TransformerBlock or type(block.attn) is not PreNorm or type(block.ffn) is not PreNorm:
        return "blocks must be pre-norm self-attention + feed-forward blocks"
    attn, ffn = block.attn.sublayer, block.ffn.sublayer
    if not _full_attention(attn):
        return "attention must be exact multi-head attention without QK-norm or a sparsity pattern"
    if type(ffn) not in (MLP,) and not isinstance(ffn, GatedFeedForward):
        return f"feed-forward {type(ffn).__name__} is not an MLP or a gated feed-forward"
    act = _ACTIVATION_INDEX.get(ffn.act)
    if act is None:
        return "unknown activation in the feed-forward"
    norms = [_norm(block.attn.norm, dtype), _norm(block.ffn.norm, dtype)]
    for n in norms:
        if isinstance(n, str):
            return n
    (n1, m1), (n2, m2) = norms  # type: ignore[misc]
    gated = isinstance(ffn, GatedFeedForward)

    def b(layer: nn.Linear) -> Tensor:
        return _EMPTY if layer.bias is None else layer.bias

    tensors = [*n1, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, b(attn.q_proj), b(attn.k_proj), b(attn.v_proj),
               attn.o_proj.weight, b(attn.o_proj), *n2,
               ffn.gate.weight if gated else _EMPTY, b(ffn.gate) if gated else _EMPTY, ffn.up.weight, b(ffn.up),
               ffn.down.weight, b(ffn.down)]
    if any(t.numel() and (t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu") for t in tensors[2:]):
        return "weights must be contiguous CPU tensors of the model's dtype"
    return tensors, m1 + m2, act


_Parts = tuple[list[list[Tensor]], list[list[float]], int, tuple[list[Tensor], list[float]]]


def _parts(model: nn.Module, cache: ModelCache | None) -> _Parts | str:
    """What the C++ step needs (per block: tensors with caches, norm meta; the activation index;
    the final norm), or why it cannot run `model` over `cache`."""
    if not all(hasattr(model, a) for a in ("embed", "positional", "stack", "lm_head")) or hasattr(model, "encode"):
        return "only decoder-only language models"
    if model.training:
        return "the model is in training mode (dropout)"
    p = model.lm_head.proj.weight
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return "CPU float32 or bfloat16 weights only"
    if native_gemv() is None:
        return "the C++ kernels are unavailable here"
    positional = model.positional
    if not (_input_positions_only(positional) or type(positional) is RoPE):
        return f"positional encoding {type(positional).__name__} acts on the logits"
    if type(model.stack) is not Stack:
        return f"depth wiring {type(model.stack).__name__} is not the plain residual stack"
    blocks = list(model.stack.blocks)
    if not blocks:
        return "the model has no blocks"
    parts = [_block(blk, p.dtype) for blk in blocks]
    for part in parts:
        if isinstance(part, str):
            return part
    heads = {(blk.attn.sublayer.num_heads, blk.attn.sublayer.num_kv_heads, blk.attn.sublayer.head_dim, blk.attn.sublayer.scale)
             for blk in blocks}
    if len(heads) != 1:
        return "all blocks must share head counts and scale"
    if len({part[2] for part in parts}) != 1:  # type: ignore[index]
        return "all blocks must share one activation"
    final = _norm(model.stack.final_norm, p.dtype)
    if isinstance(final, str):
        return final
    if cache is None:
        return "no cache"
    layers = list(cache.layers)
    if len(layers) != len(blocks) or any(type(c) is not KVCache for c in layers):
        return "a plain preallocated KV cache per block (not a rolling or recurrent one)"
    if any(c.k.dtype != torch.float32 or not c.k.is_contiguous() or not c.v.is_contiguous() or c.batch != 1 for c in layers):
        return "float32 contiguous caches of batch 1"
    if len({c.start for c in layers}) != 1 or layers[0].start != cache.length:
        return "the layer caches are out of step"
    if not bool(cache.keep[:, : cache.length].all()):
        return "padded prompts"
    tensors = [[*part[0], layer.k, layer.v] for part, layer in zip(parts, layers)]  # type: ignore[index]
    return tensors, [part[1] for part in parts], parts[0][2], final  # type: ignore[index,return-value]


def why_not(model: nn.Module, cache: ModelCache | None) -> str | None:
    """Why the C++ step cannot run `model` over `cache`, or None when it can."""
    parts = _parts(model, cache)
    return parts if isinstance(parts, str) else None


class NativeStep:
    """Runs `model`'s one-token steps over `cache` in C++; build with `NativeStep.create`."""

    def __init__(self, model: nn.Module, cache: ModelCache, decoder: Any) -> None:
        self.model, self.cache, self.decoder = model, cache, decoder
        positional = model.positional  # type: ignore[attr-defined]
        self.rope = positional if type(positional) is RoPE else None

    @staticmethod
    def create(model: nn.Module, cache: ModelCache) -> "NativeStep | None":
        """The C++ step for this model and cache, or None where `why_not` gives a reason."""
        parts = _parts(model, cache)
        if isinstance(parts, str):
            return None
        blocks, norms, act, final = parts
        attn = model.stack.blocks[0].attn.sublayer  # type: ignore[index,union-attr]
        scale = attn.head_dim ** -0.5 if attn.scale is None else attn.scale
        rope = model.positional if type(model.positional) is RoPE else None  # type: ignore[union-attr]
        decoder = native_gemv().Decoder(  # type: ignore[union-attr]
            blocks, norms, final[0], final[1], model.lm_head.proj.weight, float(model.lm_head.scale),  # type: ignore[union-attr]
            attn.num_heads, attn.num_kv_heads, attn.head_dim, float(scale), act,
            0 if rope is None else rope.rotary_dim, bool(rope is not None and rope.options.interleaved),
        )
        return NativeStep(model, cache, decoder)

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (1, 1) -> next-token logits (1, V); the cache advances by one position."""
        cache = self.cache
        positions = cache.next_positions(torch.ones_like(tokens, dtype=torch.bool))  # (1, 1)
        slot = cache.length
        cache.append_positions(positions, None)  # raises if the cache is full
        x = self.model.embed(tokens, positions, self.model.positional)  # type: ignore[operator]  # (1, 1, d)
        if self.rope is None:
            cos = sin = _EMPTY
        else:
            cos, sin = rope_angles(positions, self.rope.rotary_dim, self.rope.options.base)
            cos, sin = cos.reshape(-1), sin.reshape(-1)  # (r,)
        logits = self.decoder.step(x.reshape(-1), slot, cos, sin)  # (V,)
        for layer in cache.layers:
            layer.start = slot + 1
        return logits[None]
