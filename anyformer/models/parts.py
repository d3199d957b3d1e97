"""Parts: builds the standard sublayers of a model from its config, for architectures, block
kinds and depth wirings to assemble. A variant calls the parts it reuses and builds only what it
changes, so adding one never needs an edit here.

Legend: `d` width.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from torch import nn

from ..config import ConfigError, ModelConfig, parse_options
from ..nn.attention import ATTENTIONS
from ..nn.block import PLACEMENTS
from ..nn.build_context import BuildContext
from ..nn.feedforward import FEEDFORWARDS
from ..nn.norm import NORMS
from ..nn.positional import POSITIONALS, PositionalContext, PositionalEncoding
from .common import Embeddings, LMHead
from .registry import BLOCKS, DEPTHS, HEADS

O = TypeVar("O")


class Parts:
    """Builders of every standard part of the model that `cfg` describes."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    def context(self, **fields: object) -> BuildContext:
        """A build context for this model (width `cfg.dim` unless given)."""
        return BuildContext.of(self.cfg, **fields)

    def options(self, cls: type[O], options: dict, where: str) -> O:
        """A variant's `options` mapping checked against its options dataclass `cls`."""
        return parse_options(cls, options, where)

    def norm(self, dim: int | None = None) -> nn.Module:
        """A norm layer of the configured kind over `dim` (default the model width)."""
        n = self.cfg.norm
        bias = {} if n.bias is None else {"bias": n.bias}
        return NORMS.get(n.kind)(dim or self.cfg.dim, eps=n.eps, **bias)

    def positional(self, *, causal: bool) -> PositionalEncoding:
        """The positional encoding of one stack, with its options checked."""
        cfg = self.cfg
        cls = POSITIONALS.get(cfg.positional.kind)
        options = parse_options(cls.Options, cfg.positional.options, f"model.positional.options ({cfg.positional.kind})")
        ctx = PositionalContext(
            dim=cfg.dim, num_heads=cfg.attention.num_heads, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len, causal=causal
        )
        return cls(ctx, options)

    def attention(self, ctx: BuildContext) -> nn.Module:
        """A self-attention sublayer of the configured kind (it keeps its build context as
        `build_context`: the model summary costs it as causal or not)."""
        ctx = ctx.replace(cross=False)
        module = ATTENTIONS.get(self.cfg.attention.kind)(self.cfg.attention, ctx)
        module.build_context = ctx
        return module

    def cross_attention(self, ctx: BuildContext) -> nn.Module:
        """Cross-attention to an encoder's output: exact multi-head attention with the
        configured heads and kernel (the configured kind when it is 'mha')."""
        a = self.cfg.attention
        cross_cfg = a if a.kind == "mha" else dataclasses.replace(a, kind="mha", options={})
        ctx = ctx.replace(cross=True, causal=False)
        module = ATTENTIONS.get("mha")(cross_cfg, ctx)
        module.build_context = ctx
        return module

    def feedforward(self, ctx: BuildContext, *, stateful: bool = False) -> nn.Module:
        """The feed-forward sublayer of the configured kind. One that keeps a decoding state of
        its own (RWKV's token-shifted channel mixing) is built only where the block passes it
        that state (`stateful`: the sequential block without cross-attention)."""
        ffn = FEEDFORWARDS.get(self.cfg.ffn.kind).build(self.cfg.ffn, ctx)
        if not stateful and callable(getattr(ffn, "make_cache", None)):
            raise ConfigError(
                f"ffn kind '{self.cfg.ffn.kind}' keeps a decoding state (a token shift) that only block kind 'sequential' "
                f"of a decoder-only stack carries; here the block kind is '{self.cfg.block.kind}' in stack '{ctx.stack}'"
                f"{' with cross-attention' if ctx.cross else ''}. Use model.block.kind=sequential or another ffn kind"
            )
        return ffn

    def wrap(self, sublayer: nn.Module) -> nn.Module:
        """`sublayer` inside its residual connection and norm(s), as `model.norm.placement` says."""
        cfg = self.cfg
        placement = PLACEMENTS.get(cfg.norm.placement)
        out_norm = self.norm() if cfg.norm.placement == "sandwich" else None
        return placement(sublayer, self.norm(), out_norm=out_norm, dropout=cfg.dropout)

    def require_pre_norm_self_attention(self, ctx: BuildContext, kind: str) -> None:
        """Raise ConfigError unless block kind `kind` can be built here: no cross-attention
        (encoder-decoder decoders) and pre-norm placement (for blocks that normalise the input
        of parallel sublayers themselves)."""
        if ctx.cross:
            raise ConfigError(f"block kind '{kind}' has no cross-attention; encoder-decoder models use block kind 'sequential'")
        if self.cfg.norm.placement != "pre":
            raise ConfigError(
                f"block kind '{kind}' normalises the input of both sublayers (pre-norm); got model.norm.placement="
                f"'{self.cfg.norm.placement}'. Set it to 'pre'"
            )

    def block(self, ctx: BuildContext) -> nn.Module:
        """One block of the configured kind."""
        return BLOCKS.get(self.cfg.block.kind)(self, ctx)

    def stack(self, num_layers: int, *, causal: bool, cross: bool = False, name: str = "decoder") -> nn.Module:
        """`num_layers` blocks wired across depth as `model.depth.kind` says, with the final norm
        when the config asks for one."""
        base = self.context(num_layers=num_layers, causal=causal, cross=cross, stack=name)
        blocks = [self.block(base.replace(layer_index=i)) for i in range(num_layers)]
        final_norm = self.norm() if self.cfg.final_norm else None
        return DEPTHS.get(self.cfg.depth.kind)(self, base, blocks, final_norm)

    def embeddings(self) -> Embeddings:
        """Token embeddings with the configured scale, token types, norm and dropout."""
        cfg = self.cfg
        return Embeddings(
            cfg.vocab_size, cfg.dim, scale=cfg.embed_scale, num_token_types=cfg.num_token_types,
            norm=self.norm() if cfg.embed_norm else None, dropout=cfg.dropout,
        )

    def lm_head(self, embed: Embeddings) -> LMHead:
        """The unembedding to vocabulary logits, tied to `embed` when the config says so."""
        cfg = self.cfg
        return LMHead(cfg.dim, cfg.vocab_size, tied=embed.tokens if cfg.tie_embeddings else None, scale=cfg.logit_scale)

    def head(self, embed: Embeddings) -> nn.Module:
        """An encoder's output head of the configured kind."""
        return HEADS.get(self.cfg.head.kind)(self, embed)
