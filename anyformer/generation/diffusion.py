"""Draft-and-edit decoding for masked-diffusion language models (task `masked_diffusion`).

Legend: `b` batch, `n` positions, `V` vocabulary (the mask id included), `L` positions to fill.

A masked-diffusion model is an encoder that predicts, at every position holding the mask id,
the token there given all the other positions. Decoding starts from a sequence in which the
positions to fill (`fill`) hold the mask id, and unmasks them over `steps` steps. After step
s of S, exactly floor(L * s / S) of the L positions hold a drafted token (a linear schedule:
the masking rate falls from 1 to 0 in equal parts), so every position is drafted at the end.

One step: the model runs once on the whole sequence; at every masked position a token is drawn
from its prediction (temperature, top-k; the most likely token at temperature 0; the mask id is
never drawn), and the token's probability is its confidence. Which positions hold a draft after
the step (`order`):

- `confidence`: the masked positions with the most confident draws (the others stay masked);
- `random`: masked positions chosen uniformly at random (ancestral sampling of the diffusion);
- `left_to_right`: the leftmost masked positions.

Earlier drafts stay fixed, except with `edit` (order `confidence` only): every draft made so far
competes with the new draws by its confidence (the probability it had when it was drawn), the
floor(L * s / S) most confident of them all are kept, and the rest are masked again, so a token
drafted early with little context is redrawn later with more of it (low-confidence remasking
of drafts). Positions outside `fill` (a prompt, or the text on both sides of a gap) are never
changed.

With S = L and no edits, exactly one position is drafted per step: the most confident one, a
random one, or the leftmost one (greedy left-to-right decoding at temperature 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ORDERS = ("confidence", "random", "left_to_right")


@dataclass
class DiffusionConfig:
    """How to unmask: `steps` model calls per filled block, the draw (temperature 0 = most
    likely token; top_k 0 = off), the order of unmasking, low-confidence remasking of earlier
    drafts (`edit`), and the seed of the draws (None: nondeterministic)."""

    steps: int = 64
    temperature: float = 1.0
    top_k: int = 0
    order: str = "confidence"
    edit: bool = False
    seed: int | None = None

    def validate(self) -> "DiffusionConfig":
        """Raise ValueError naming the bad option; return self."""
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        if self.edit and self.order != "confidence":
            raise ValueError(f"edit (low-confidence remasking of drafts) ranks drafts by confidence: it needs order "
                             f"'confidence', not {self.order!r}")
        return self


StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]  # (step, tokens (b, n), masked (b, n), fill (b, n))


def _draw(logits: Tensor, config: DiffusionConfig, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Tokens (b, n) drawn from logits (b, n, V) and their probabilities (b, n)."""
    logits = logits.float()
    if config.temperature == 0:
        probs = logits.softmax(-1)
        conf, tokens = probs.max(-1)
        return tokens, conf
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    flat = probs.flatten(0, 1)
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


@torch.no_grad()
def diffusion_fill(model: nn.Module, tokens: Tensor, fill: Tensor, mask_id: int, config: DiffusionConfig,
                   on_step: StepCallback | None = None) -> Tensor:
    """Fill the positions `fill` (b, n) bool of `tokens` (b, n) by iterative unmasking (the module
    docstring gives the rule); every row must have the same number L of positions to fill, and
    `config.steps` must be at most L. Returns the filled tokens (b, n); positions outside `fill`
    are returned unchanged. `on_step(s, tokens, masked, fill)` sees the state after each step."""
    config.validate()
    if tokens.shape != fill.shape or tokens.dim() != 2:
        raise ValueError(f"tokens and fill must both be (batch, length); got {tuple(tokens.shape)} and {tuple(fill.shape)}")
    counts = fill.sum(-1)
    length = int(counts[0]) if counts.numel() else 0
    if not bool((counts == length).all()):
        raise ValueError(f"every row must have the same number of positions to fill; got {counts.tolist()}")
    if length == 0:
        return tokens.clone()
    if config.steps > length:
        raise ValueError(f"steps={config.steps} is more than the {length} positions to fill; use at most {length} "
                         f"(one position per step)")
    device = tokens.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    x = torch.where(fill, torch.full_like(tokens, mask_id), tokens)
    masked = fill.clone()
    confidence = torch.zeros(tokens.shape, dtype=torch.float32, device=device)
    drafted_before = 0
    for step in range(1, config.steps + 1):
        target = length * step // config.steps  # drafted positions per row after this step
        logits = model(x).float()
        logits[..., mask_id] = float("-inf")
        drawn, conf = _draw(logits, config, generator)
        if config.order == "confidence":
            score = conf
        elif config.order == "random":
            score = torch.rand(tokens.shape, generator=generator, device=device)
        else:  # leftmost first
            score = -torch.arange(tokens.shape[1], device=device, dtype=torch.float32).expand(tokens.shape)
        if config.edit:  # every draft so far competes with the new draws
            candidate_score = torch.where(masked, score, confidence)
            candidates, keep_count = fill, target
        else:  # only the masked positions compete for the new slots
            candidate_score, candidates, keep_count = score, masked, target - drafted_before
        ranked = candidate_score.masked_fill(~candidates, float("-inf"))
        order = ranked.argsort(dim=-1, descending=True, stable=True)[:, :keep_count]  # (b, keep_count)
        keep = torch.zeros_like(fill).scatter_(1, order, True) & candidates
        new = keep & masked
        x = torch.where(new, drawn, x)
        confidence = torch.where(new, conf, confidence)
        if config.edit:
            dropped = fill & ~keep & ~masked  # earlier drafts masked again
            x = torch.where(dropped, torch.full_like(x, mask_id), x)
            masked = fill & ~keep
        else:
            masked = masked & ~new
        drafted_before = target
        if on_step is not None:
            on_step(step, x, masked, fill)
    return x


def diffusion_generate(model: nn.Module, prompt: list[int], max_new_tokens: int, mask_id: int, context: int,
                       config: DiffusionConfig, *, block: int | None = None, on_step: StepCallback | None = None) -> list[int]:
    """`max_new_tokens` tokens after `prompt`. When prompt and new tokens fit in the model's
    `context`, one fill of all new positions; otherwise (or when `block` is given) the new tokens
    are drafted in blocks of `block` (default context // 2), each conditioned on the last
    context - block tokens before it (a sliding context, as a decoder's window), with
    `config.steps` steps per block (at most the block's length)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if block is None and len(prompt) + max_new_tokens <= context:
        block = max_new_tokens
    block = block or context // 2
    if not 1 <= block < context:
        raise ValueError(f"the block of new tokens drafted together must be between 1 and context - 1 = {context - 1}; got {block}")
    device = next(model.parameters()).device
    out = list(prompt)
    remaining, blocks = max_new_tokens, 0
    while remaining:
        size = min(block, remaining)
        left = out[max(0, len(out) - (context - size)):] if context - size > 0 else []
        ids = torch.tensor([left + [mask_id] * size], device=device)
        fill = torch.zeros_like(ids, dtype=torch.bool)
        fill[:, len(left):] = True
        steps = min(config.steps, size)
        seed = None if config.seed is None else config.seed + blocks
        filled = diffusion_fill(model, ids, fill, mask_id, DiffusionConfig(**{**vars(config), "steps": steps, "seed": seed}), on_step)
        out += filled[0, len(left):].tolist()
        remaining, blocks = remaining - size, blocks + 1
    return out[len(prompt):]
