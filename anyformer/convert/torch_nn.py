"""Copy weights from torch.nn's attention and Transformer layers into our modules.

`torch.nn.MultiheadAttention` -> MultiHeadAttention; `torch.nn.TransformerEncoderLayer` ->
TransformerBlock; `torch.nn.TransformerDecoderLayer` -> CrossAttentionBlock. The blocks'
structure (post- or pre-norm, activation, widths) comes from `config_from_torch_layer`, and
`block_from_torch` builds and fills one in a single call.

Legend: `d` model width, `f` feed-forward width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, from_dict
from ..nn.attention import MultiHeadAttention
from ..nn.block import CrossAttentionBlock, TransformerBlock
from .hf import ConversionError


def _copy(dst: Tensor | None, src: Tensor | None, name: str) -> None:
    if (dst is None) != (src is None):
        have = "has" if src is not None else "has no"
        raise ConversionError(f"{name}: the torch module {have} this tensor but the target {'has no' if dst is None else 'has'} place for it")
    if dst is None or src is None:
        return
    if dst.shape != src.shape:
        raise ConversionError(f"{name}: torch shape {tuple(src.shape)} does not fit the target's {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def copy_multihead_attention(src: nn.MultiheadAttention, dst: MultiHeadAttention) -> None:
    """Copy a torch.nn.MultiheadAttention's projections into our MultiHeadAttention.

    Supports the fused in_proj (same q/k/v width) and separate q/k/v projections (kdim/vdim);
    bias_k/bias_v and add_zero_attn have no counterpart and raise.
    """
    if not isinstance(src, nn.MultiheadAttention):
        raise TypeError(f"expected torch.nn.MultiheadAttention, got {type(src).__name__}")
    if src.bias_k is not None or src.add_zero_attn:
        raise ConversionError("torch MultiheadAttention with add_bias_kv or add_zero_attn has no equivalent in MultiHeadAttention")
    if src.num_heads != dst.num_heads or dst.num_kv_heads != dst.num_heads:
        raise ConversionError(
            f"head counts differ: torch has {src.num_heads} heads, the target {dst.num_heads} query / {dst.num_kv_heads} key-value heads"
        )
    if src.kdim != src.vdim:
        raise ConversionError(f"torch MultiheadAttention with kdim={src.kdim} != vdim={src.vdim} has no equivalent (one kv_dim)")
    if src._qkv_same_embed_dim:
        q_w, k_w, v_w = src.in_proj_weight.chunk(3, dim=0)  # each (d, d)
    else:
        q_w, k_w, v_w = src.q_proj_weight, src.k_proj_weight, src.v_proj_weight
    biases = src.in_proj_bias.chunk(3, dim=0) if src.in_proj_bias is not None else (None, None, None)
    for name, w, b in zip("qkv", (q_w, k_w, v_w), biases):
        proj = getattr(dst, f"{name}_proj")
        _copy(proj.weight, w, f"{name}_proj.weight")
        _copy(proj.bias, b, f"{name}_proj.bias")
    _copy(dst.o_proj.weight, src.out_proj.weight, "out_proj.weight")
    _copy(dst.o_proj.bias, src.out_proj.bias, "out_proj.bias")


def _copy_norm(dst: nn.Module, src: nn.LayerNorm, name: str) -> None:
    _copy(dst.weight, src.weight, f"{name}.weight")
    _copy(getattr(dst, "bias", None), src.bias, f"{name}.bias")


def _copy_ffn(dst: nn.Module, src: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> None:
    _copy(dst.up.weight, src.linear1.weight, "linear1.weight")
    _copy(dst.up.bias, src.linear1.bias, "linear1.bias")
    _copy(dst.down.weight, src.linear2.weight, "linear2.weight")
    _copy(dst.down.bias, src.linear2.bias, "linear2.bias")


def copy_encoder_layer(src: nn.TransformerEncoderLayer, dst: TransformerBlock) -> None:
    """Copy a torch.nn.TransformerEncoderLayer into a TransformerBlock of the same placement."""
    if not isinstance(src, nn.TransformerEncoderLayer):
        raise TypeError(f"expected torch.nn.TransformerEncoderLayer, got {type(src).__name__}")
    copy_multihead_attention(src.self_attn, dst.attn.sublayer)
    _copy_norm(dst.attn.norm, src.norm1, "norm1")
    _copy_ffn(dst.ffn.sublayer, src)
    _copy_norm(dst.ffn.norm, src.norm2, "norm2")


def copy_decoder_layer(src: nn.TransformerDecoderLayer, dst: CrossAttentionBlock) -> None:
    """Copy a torch.nn.TransformerDecoderLayer into a CrossAttentionBlock of the same placement."""
    if not isinstance(src, nn.TransformerDecoderLayer):
        raise TypeError(f"expected torch.nn.TransformerDecoderLayer, got {type(src).__name__}")
    copy_multihead_attention(src.self_attn, dst.attn.sublayer)
    _copy_norm(dst.attn.norm, src.norm1, "norm1")
    copy_multihead_attention(src.multihead_attn, dst.cross_attn.sublayer)
    _copy_norm(dst.cross_attn.norm, src.norm2, "norm2")
    _copy_ffn(dst.ffn.sublayer, src)
    _copy_norm(dst.ffn.norm, src.norm3, "norm3")


def _activation(layer: nn.Module) -> str:
    act = layer.activation
    if act is nn.functional.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is nn.functional.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return "gelu_tanh"
    if act is nn.functional.silu or isinstance(act, nn.SiLU):
        return "silu"
    raise ConfigError(f"activation {act!r} of the torch layer is not supported; supported: relu, gelu, gelu (tanh), silu")


def config_from_torch_layer(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> ModelConfig:
    """A ModelConfig whose blocks have the structure of a torch.nn Transformer layer.

    Only the block-level fields (width, heads, norm placement and eps, feed-forward) are
    meaningful; the vocabulary and positional fields are placeholders.
    """
    if not isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        raise TypeError(f"expected a torch.nn.TransformerEncoderLayer or TransformerDecoderLayer, got {type(layer).__name__}")
    attn = layer.self_attn
    dim = attn.embed_dim
    bias = attn.in_proj_bias is not None
    data = dict(
        arch="encoder", vocab_size=1, dim=dim, num_layers=1,
        attention=dict(kind="mha", kernel="eager", num_heads=attn.num_heads, bias=bias, out_bias=attn.out_proj.bias is not None),
        positional=dict(kind="none"),
        norm=dict(kind="layernorm", eps=float(layer.norm1.eps), bias=layer.norm1.bias is not None,
                  placement="pre" if layer.norm_first else "post"),
        ffn=dict(kind="mlp", activation=_activation(layer), bias=layer.linear1.bias is not None, hidden_dim=layer.linear1.out_features),
        final_norm=False,
    )
    return from_dict(ModelConfig, data).validate()


def block_from_torch(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> nn.Module:
    """Our block (TransformerBlock or CrossAttentionBlock, eval mode) with a torch layer's weights."""
    from ..models.builders import build_block

    cfg = config_from_torch_layer(layer)
    if isinstance(layer, nn.TransformerDecoderLayer):
        block = build_block(cfg, causal=False, cross=True)
        copy_decoder_layer(layer, block)
    else:
        block = build_block(cfg, causal=False)
        copy_encoder_layer(layer, block)
    return block.eval()


__all__ = [
    "block_from_torch",
    "config_from_torch_layer",
    "copy_decoder_layer",
    "copy_encoder_layer",
    "copy_multihead_attention",
]
