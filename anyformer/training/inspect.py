"""Looking inside a trained model: the attention weights of every layer and head for one input,
their per-head entropy and mean attention distance, and a PNG grid of the maps.

Attention kinds that compute explicit weights (the exact kinds, the sparse patterns,
differential and selective attention, linear attention's normalised implied weights) hand
them over through the model's `attn_store`; kinds that never form them (Performer,
HyperAttention) add nothing, and `attention_maps` says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import save_figure


@torch.no_grad()
def attention_maps(model: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """One (heads, n, m) weight map per attention layer for a single input: token ids (1, n)
    for a decoder or an encoder, an image (1, c, H, W) for a ViT, or a tuple of the forward's
    inputs (an encoder-decoder's source and target)."""
    import inspect

    if "attn_store" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"architecture {getattr(getattr(model, 'config', None), 'arch', type(model).__name__)!r} does not hand "
                         "over its attention weights (its forward takes no attn_store), so there are no maps to show")
    store: list[Tensor] = []
    was_training = model.training
    model.eval()
    model(*(inputs if isinstance(inputs, tuple) else (inputs,)), attn_store=store)
    model.train(was_training)
    kind = getattr(getattr(getattr(model, "config", None), "attention", None), "kind", "?")
    if not store:
        raise ValueError(
            f"attention kind {kind!r} never forms its attention weights (it approximates softmax attention "
            "without them), so there are no maps to show; the exact, sparse, differential, selective and "
            "linear kinds have them"
        )
    return [w[0].float().cpu() for w in store]


def head_statistics(maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(layers, heads) mean entropy of the attention rows (nats) and mean attention distance
    (the expected |query - key| in tokens, averaged over queries)."""
    ent, dist = [], []
    for w in maps:
        n, m = w.shape[-2:]
        p = w.clamp_min(0)
        ent.append(-(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1))
        gap = (torch.arange(n)[:, None] + (m - n) - torch.arange(m)[None]).abs().float()  # queries are the last n keys
        dist.append((p * gap).sum(-1).mean(-1))
    return torch.stack(ent), torch.stack(dist)


def plot_attention_grid(maps: list[Tensor], path: Path, labels: list[str] | None = None, title: str = "") -> Path:
    """Every layer (rows) and head (columns) as a heat map; token labels on the axes when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = len(maps), max(w.shape[0] for w in maps)
    cell = 1.8 if labels is None or len(labels) <= 12 else 2.6
    fig, axes = plt.subplots(layers, heads, figsize=(cell * heads + 0.6, cell * layers + 0.6), squeeze=False)
    entropy, distance = head_statistics(maps)
    for i, w in enumerate(maps):
        for j in range(heads):
            ax = axes[i][j]
            if j >= w.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(w[j].numpy(), cmap="viridis", vmin=0, vmax=float(w[j].max()) or 1.0)
            ax.set_title(f"L{i} H{j}  H={float(entropy[i, j]):.2f}  d={float(distance[i, j]):.1f}", fontsize=6)
            if labels is not None and len(labels) <= 24:
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(len(labels)), labels, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
