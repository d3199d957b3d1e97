"""The one place where a ModelConfig becomes modules."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, ModelConfig, parse_options
from ..nn.attention import ATTENTIONS
from ..nn.block import PLACEMENTS, CrossAttentionBlock, TransformerBlock
from ..nn.feedforward import FEEDFORWARDS, hidden_size
from ..nn.norm import NORMS
from ..nn.positional import POSITIONALS, PositionalContext, PositionalEncoding
from ..registry import RegistryError
from .common import Embeddings, LMHead, Stack
from .decoder import DecoderLM
from .encoder import HEADS, EmbeddingHead, MaskedLMHead, Pooler, SequenceClassificationHead, TokenClassificationHead
from .encoder_decoder import EncoderDecoder


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """A norm layer of the configured kind."""
    return NORMS.get(cfg.norm.kind)(dim or cfg.dim, eps=cfg.norm.eps, bias=cfg.norm.bias)


def build_positional(cfg: ModelConfig, *, causal: bool) -> PositionalEncoding:
    """The positional encoding of one stack, with its options checked."""
    cls = POSITIONALS.get(cfg.positional.kind)
    options = parse_options(cls.Options, cfg.positional.options, f"model.positional.options ({cfg.positional.kind})")
    ctx = PositionalContext(
        dim=cfg.dim, num_heads=cfg.attention.num_heads, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len, causal=causal
    )
    return cls(ctx, options)


def build_ffn(cfg: ModelConfig) -> nn.Module:
    """The feed-forward sublayer."""
    f = cfg.ffn
    hidden = hidden_size(cfg.dim, f.hidden_mult, f.hidden_dim, f.multiple_of)
    return FEEDFORWARDS.get(f.kind)(cfg.dim, hidden, activation=f.activation, bias=f.bias, dropout=f.dropout)


def _wrap(cfg: ModelConfig, sublayer: nn.Module) -> nn.Module:
    placement = PLACEMENTS.get(cfg.norm.placement)
    out_norm = build_norm(cfg) if cfg.norm.placement == "sandwich" else None
    return placement(sublayer, build_norm(cfg), out_norm=out_norm, dropout=cfg.dropout)


def build_attention(cfg: ModelConfig, *, causal: bool, cross: bool = False) -> nn.Module:
    """An attention sublayer of the configured kind."""
    return ATTENTIONS.get(cfg.attention.kind)(cfg.attention, dim=cfg.dim, causal=causal, cross=cross)


def build_block(cfg: ModelConfig, *, causal: bool, cross: bool = False) -> nn.Module:
    """One block: self-attention (+ cross-attention) + feed-forward, each in its placement."""
    attn = _wrap(cfg, build_attention(cfg, causal=causal))
    ffn = _wrap(cfg, build_ffn(cfg))
    if cross:
        cross_cfg = cfg.attention if cfg.attention.kind == "mha" else _mha_of(cfg)
        cross_attn = ATTENTIONS.get("mha")(cross_cfg, dim=cfg.dim, causal=False, cross=True)
        return CrossAttentionBlock(attn, _wrap(cfg, cross_attn), ffn)
    return TransformerBlock(attn, ffn)


def _mha_of(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    """The attention config with kind 'mha' (cross-attention is always exact)."""
    import dataclasses

    return dataclasses.replace(cfg.attention, kind="mha", options={})


def build_stack(cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool = False) -> Stack:
    """`num_layers` blocks and the final norm (if the config asks for one)."""
    blocks = [build_block(cfg, causal=causal, cross=cross) for _ in range(num_layers)]
    return Stack(blocks, build_norm(cfg) if cfg.final_norm else None)


def build_embeddings(cfg: ModelConfig) -> Embeddings:
    """Token embeddings with the configured scale, token types, norm and dropout."""
    return Embeddings(
        cfg.vocab_size,
        cfg.dim,
        scale=cfg.embed_scale,
        num_token_types=cfg.num_token_types,
        norm=build_norm(cfg) if cfg.embed_norm else None,
        dropout=cfg.dropout,
    )


def build_head(cfg: ModelConfig, embed: Embeddings) -> nn.Module:
    """The encoder's output head."""
    h = cfg.head
    HEADS.get(h.kind)  # unknown names raise with the valid list
    if h.kind == "mlm":
        return MaskedLMHead(cfg.dim, cfg.vocab_size, norm=build_norm(cfg), tied=embed.tokens if cfg.tie_embeddings else None)
    if h.kind == "sequence_classification":
        return SequenceClassificationHead(Pooler(cfg.dim, pooling=h.pooling, dense=h.pooler), cfg.dim, h.num_labels, dropout=cfg.dropout)
    if h.kind == "token_classification":
        return TokenClassificationHead(cfg.dim, h.num_labels, dropout=cfg.dropout)
    if h.kind == "embedding":
        return EmbeddingHead(Pooler(cfg.dim, pooling=h.pooling, dense=h.pooler), normalize=h.normalize)
    return HEADS.get("none")()


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases, unit norms."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=std)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model a config describes (DecoderLM, EncoderModel, EncoderDecoder or VisionTransformer)."""
    cfg.validate()
    try:
        if cfg.arch == "decoder":
            embed = build_embeddings(cfg)
            head = LMHead(cfg.dim, cfg.vocab_size, tied=embed.tokens if cfg.tie_embeddings else None, scale=cfg.logit_scale)
            model: nn.Module = DecoderLM(cfg, embed, build_positional(cfg, causal=True), build_stack(cfg, cfg.num_layers, causal=True), head)
        elif cfg.arch == "encoder":
            from .encoder import EncoderModel

            embed = build_embeddings(cfg)
            model = EncoderModel(
                cfg, embed, build_positional(cfg, causal=False), build_stack(cfg, cfg.num_layers, causal=False), build_head(cfg, embed)
            )
        elif cfg.arch == "vit":
            from .vit import ImageClassificationHead, PatchEmbedding, VisionTransformer

            v = cfg.vision
            model = VisionTransformer(
                cfg,
                PatchEmbedding(v.channels, v.patch_size, cfg.dim, v.image_size, dropout=cfg.dropout),
                build_positional(cfg, causal=False),
                build_stack(cfg, cfg.num_layers, causal=False),
                ImageClassificationHead(cfg.dim, cfg.head.num_labels if cfg.head.kind == "sequence_classification" else 0),
            )
        else:
            src = build_embeddings(cfg)
            tgt = src if cfg.share_embeddings else build_embeddings(cfg)
            model = EncoderDecoder(
                cfg,
                src_embed=src,
                tgt_embed=tgt,
                enc_positional=build_positional(cfg, causal=False),
                dec_positional=build_positional(cfg, causal=True),
                encoder=build_stack(cfg, cfg.num_layers, causal=False),
                decoder=build_stack(cfg, cfg.num_decoder_layers or cfg.num_layers, causal=True, cross=True),
                lm_head=LMHead(cfg.dim, cfg.vocab_size, tied=tgt.tokens if cfg.tie_embeddings else None, scale=cfg.logit_scale),
            )
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    init_weights(model, cfg.init_std)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["build_model", "count_parameters", "init_weights"]
