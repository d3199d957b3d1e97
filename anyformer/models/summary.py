"""Model summary: parameter counts, FLOPs per token, activation-memory estimate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..config import ModelConfig
from ..nn.attention.cost import mixing_flops, step_flops
from ..nn.positional import PositionalEncoding
from .builders import build_model, count_parameters


@dataclass
class ModelSummary:
    """Figures of one model at a given batch size and sequence length."""

    arch: str
    parameters: int
    embedding_parameters: int
    non_embedding_parameters: int
    flops_per_token_forward: float
    flops_per_token_training: float
    flops_per_token_decoding: float | None  # one decoding step with seq_len - 1 tokens cached; None: no decoding
    activation_bytes: float
    batch: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        def human(x: float, unit: str = "") -> str:
            for suffix in ("", "K", "M", "G", "T", "P"):
                if abs(x) < 1000:
                    return f"{x:.3g}{suffix}{unit}"
                x /= 1000
            return f"{x:.3g}E{unit}"

        return "\n".join(
            [
                f"architecture            {self.arch}",
                f"parameters              {human(self.parameters)} ({self.parameters:,})",
                f"  embedding             {human(self.embedding_parameters)}",
                f"  non-embedding         {human(self.non_embedding_parameters)}",
                f"FLOPs/token forward     {human(self.flops_per_token_forward)} (context {self.seq_len})",
                f"FLOPs/token training    {human(self.flops_per_token_training)}",
                *([f"FLOPs/token decoding    {human(self.flops_per_token_decoding)} (one step, {self.seq_len - 1} tokens cached)"]
                  if self.flops_per_token_decoding is not None else []),
                f"activation memory       {human(self.activation_bytes, 'B')} (batch {self.batch} x {self.seq_len}, 16-bit, training)",
            ]
        )


def _embedding_params(model: nn.Module) -> int:
    seen: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            seen[id(mod.weight)] = mod.weight
    return sum(p.numel() for p in seen.values())


def tied_head_flops(model: nn.Module) -> float:
    """FLOPs per token of the output projections that reuse an embedding's weight (a tied LM or
    masked-LM head), which the weight count leaves out with the embeddings: 2 per weight."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return float(sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in embeddings))


def flops_per_token(cfg: ModelConfig, non_embedding_params: int, seq_len: int, *, extra_layers: int = 0,
                    mixing: float | None = None) -> float:
    """Forward FLOPs per token (Kaplan et al. 2020): 2 per weight multiply-add, plus the
    sequence mixing, plus the LM head. `mixing`: what the model's mixers declare per token
    (`mixing_per_token`); without it, softmax attention's scores and mixing over the context
    (half of it under a causal mask). `extra_layers`: block applications beyond one per
    configured layer (a looped depth wiring; their weights are counted in
    `non_embedding_params` once per application)."""
    attn_width = cfg.attention.num_heads * cfg.head_dim
    layers = cfg.num_layers + (cfg.num_decoder_layers or cfg.num_layers if cfg.arch == "encoder_decoder" else 0) + extra_layers
    causal = cfg.arch in ("decoder", "encoder_decoder")
    context = seq_len / 2 if causal else seq_len
    attention = 2 * 2 * layers * context * attn_width if mixing is None else mixing
    head = 2 * cfg.dim * cfg.vocab_size if causal or (cfg.arch == "encoder" and cfg.head.kind == "mlm") else 0
    return 2.0 * non_embedding_params + attention + head


def _mixers(model: nn.Module):  # type: ignore[no-untyped-def]
    """(mixer module, its build context, applications per forward) of every sequence mixer in
    the model's stacks (the modules `Parts` built, which keep their `build_context`)."""
    from .common import Stack

    for stack in model.modules():
        if isinstance(stack, Stack) and len(stack.blocks):
            factor = stack.block_calls() / len(stack.blocks)
            for block in stack.blocks:
                for mod in block.modules():
                    ctx = getattr(mod, "build_context", None)
                    if ctx is not None:
                        yield mod, ctx, factor


def _positional_costs(model: nn.Module):  # type: ignore[no-untyped-def]
    """`cost(ctx, queries, keys)`: what the model's positional encoding adds per query to the
    self-attention mixer built with `ctx` (PositionalEncoding.mixing_flops; cross-attention
    reads no positions), the encoding of the mixer's direction (an encoder-decoder has two)."""
    encodings = {bool(getattr(p.ctx, "causal", False)): p for p in model.modules() if isinstance(p, PositionalEncoding) and p.ctx is not None}

    def cost(ctx, queries: int, keys: int) -> float:  # type: ignore[no-untyped-def]
        pos = encodings.get(bool(ctx.causal)) or (next(iter(encodings.values())) if len(encodings) == 1 else None)
        return 0.0 if pos is None or ctx.cross else float(pos.mixing_flops(queries, keys, causal=ctx.causal))

    return cost


def _costed_positional_params(model: nn.Module) -> int:
    """Parameters of positional encodings that state their own cost (their tables are read by
    the queries, not applied as weights to every token), which the weight count leaves out."""
    seen = {id(p): p.numel() for m in model.modules() if isinstance(m, PositionalEncoding)
            and type(m).mixing_flops is not PositionalEncoding.mixing_flops for p in m.parameters()}
    return sum(seen.values())


def mixing_per_token(model: nn.Module, seq_len: int) -> float | None:
    """The mixing FLOPs per token of a forward over `seq_len` tokens, from what each mixer
    declares (anyformer/nn/attention/cost.py), each block per application; cross-attention
    reads `seq_len` source tokens. None when the model's stacks hold no such sublayer."""
    found = list(_mixers(model))
    if not found:
        return None
    pos = _positional_costs(model)
    return sum(f * (mixing_flops(m, seq_len, seq_len, causal=c.causal) + pos(c, seq_len, seq_len)) for m, c, f in found)


def decoding_mixing(model: nn.Module, seq_len: int) -> float | None:
    """The mixing FLOPs of one decoding step with `seq_len - 1` tokens cached: each causal
    mixer's `step_flops`, each cross-attention over `seq_len` source tokens (an encoder runs
    once per input, not per step). None for a model with no causal mixer."""
    found = list(_mixers(model))
    if not any(c.causal for _, c, _ in found):
        return None
    pos = _positional_costs(model)
    return sum(f * (step_flops(m, seq_len - 1) + pos(c, 1, seq_len) if c.causal else mixing_flops(m, 1, seq_len, causal=False))
               for m, c, f in found if c.causal or c.cross)


def decoding_flops(model: nn.Module, seq_len: int) -> float | None:
    """FLOPs of one decoding step with `seq_len - 1` tokens cached (None for a model with no
    causal mixer): the weights that run per step, 2 per weight, the mixing of `decoding_mixing`
    and the LM head. A stack with no causal mixer (an encoder) runs once per input, not per
    step, and so do the key and value projections of cross-attention (their output is cached)."""
    from .common import Stack

    step = decoding_mixing(model, seq_len)
    if step is None:
        return None
    weights = _applied_weights(model)
    for stack in model.modules():
        if isinstance(stack, Stack) and len(stack.blocks):
            mixers = [c for block in stack.blocks for mod in block.modules() if (c := getattr(mod, "build_context", None)) is not None]
            if mixers and not any(c.causal for c in mixers):
                weights -= count_parameters(stack) * stack.block_calls() // len(stack.blocks)
    for mod, ctx, factor in _mixers(model):
        if ctx.cross:
            weights -= round(factor * sum(p.numel() for name in ("k_proj", "v_proj") for p in getattr(mod, name).parameters()))
    return 2.0 * weights + step + tied_head_flops(model)


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, bytes_per_value: int = 2) -> float:
    """Activations kept for the backward pass (Korthikanti et al. 2022, no recomputation):
    per layer s*b*d*(34 + 5*h*s/d) bytes at 16 bits, plus the logits and their gradient."""
    layers = cfg.num_layers + (cfg.num_decoder_layers or cfg.num_layers if cfg.arch == "encoder_decoder" else 0)
    s, b, d, h = seq_len, batch, cfg.dim, cfg.attention.num_heads
    per_layer = s * b * d * (34 + 5 * h * s / d) * bytes_per_value / 2
    logits = 2 * b * s * cfg.vocab_size * 4
    return layers * per_layer + logits


def _reused_blocks(model: nn.Module) -> tuple[int, int]:
    """(weights applied again, extra block applications) per forward, from each stack's
    `block_calls` beyond its number of blocks (weight-shared depth)."""
    from .common import Stack

    weights = layers = 0
    for stack in model.modules():
        if isinstance(stack, Stack) and len(stack.blocks) and stack.block_calls() > len(stack.blocks):
            repeat = stack.block_calls() / len(stack.blocks) - 1
            weights += round(repeat * sum(p.numel() for p in stack.blocks.parameters()))
            layers += stack.block_calls() - len(stack.blocks)
    return weights, layers


def stack_flops_per_token(model: nn.Module, seq_len: int, cfg: ModelConfig | None = None) -> float:
    """Forward FLOPs per token of `model` counted as a plain stack (its weights once per
    application, what its mixers declare, the head of `cfg`'s architecture; default the model's
    own config): what `summarize` states for a model that declares no `flops_per_token`, and
    the base an architecture that does declare it adds its own work to."""
    return flops_per_token(cfg or model.config, _applied_weights(model), seq_len, extra_layers=_reused_blocks(model)[1],  # type: ignore[arg-type]
                           mixing=mixing_per_token(model, seq_len))


def _applied_weights(model: nn.Module) -> int:
    """The weights a forward multiplies with, each once per application: every non-embedding
    parameter, blocks a depth wiring reuses counted again, less the positional parameters whose
    cost the encoding declares itself."""
    return count_parameters(model) - _embedding_params(model) + _reused_blocks(model)[0] - _costed_positional_params(model)


def summarize(model_or_cfg: nn.Module | ModelConfig, batch: int = 1, seq_len: int | None = None) -> ModelSummary:
    """Summary of a built model or a config (built on the meta device, no memory used)."""
    if isinstance(model_or_cfg, ModelConfig):
        import torch

        with torch.device("meta"):
            model = build_model(model_or_cfg)
        cfg = model_or_cfg
    else:
        model, cfg = model_or_cfg, model_or_cfg.config  # type: ignore[assignment]
    fixed = getattr(model, "tokens_per_input", None)  # a model whose input is always the same number of tokens (patches)
    seq_len = seq_len or (fixed() if callable(fixed) else cfg.max_seq_len)
    total = count_parameters(model)
    emb = _embedding_params(model)
    # an architecture whose work per token differs from a plain stack's says so, for a forward
    # and (when it decodes) for one decoding step
    own = getattr(model, "flops_per_token", None)
    own_step = getattr(model, "decoding_flops_per_token", None)
    fwd = own(seq_len) if callable(own) else stack_flops_per_token(model, seq_len)
    decoding = own_step(seq_len) if callable(own_step) else None if callable(own) else decoding_flops(model, seq_len)
    return ModelSummary(
        arch=cfg.arch,
        parameters=total,
        embedding_parameters=emb,
        non_embedding_parameters=total - emb,
        flops_per_token_forward=fwd,
        flops_per_token_training=3 * fwd,
        flops_per_token_decoding=decoding,
        activation_bytes=activation_bytes(cfg, batch, seq_len),
        batch=batch,
        seq_len=seq_len,
    )
