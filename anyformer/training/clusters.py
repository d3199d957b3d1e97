"""Token clusters across depth (Geshkovski et al. 2023, "A mathematical perspective on
Transformers"): the token representations after every block application of a model, their
pairwise cosine similarities, how many clusters they form and the interaction energy.

Legend: `n` tokens, `d` width, `L` block applications (a looped stack counts every loop).

- similarity: cos(x_i, x_j) of the representations (each token normalised to unit length);
- clusters at threshold tau: single linkage: i and j are in one cluster when a chain of tokens
  links them with similarity >= tau at every step (connected components of that graph);
- energy (the paper's E_beta on the sphere): 1 / (2 beta n^2) * sum_ij exp(beta cos(x_i, x_j)),
  which the unnormalized (USA) dynamics increase; at most exp(beta) / (2 beta), reached when
  every token is in one point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import save_figure, write_text


def cosine_similarities(h: Tensor) -> Tensor:
    """(n, d) representations -> (n, n) cosine similarities, in float64."""
    x = h.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (x @ x.T).clamp(-1.0, 1.0)


def count_clusters(sim: Tensor, threshold: float) -> int:
    """Connected components of the graph linking tokens whose similarity is >= `threshold`
    (single-linkage clusters)."""
    n = sim.shape[0]
    linked = (sim >= threshold).cpu()
    seen = torch.zeros(n, dtype=torch.bool)
    clusters = 0
    for start in range(n):
        if seen[start]:
            continue
        clusters += 1
        frontier = torch.zeros(n, dtype=torch.bool)
        frontier[start] = True
        while frontier.any():  # grow the component by every token linked to it
            seen |= frontier
            frontier = linked[frontier].any(0) & ~seen
    return clusters


def interaction_energy(sim: Tensor, beta: float) -> float:
    """E_beta = 1 / (2 beta n^2) sum_ij exp(beta sim_ij) of unit tokens with similarities `sim`."""
    n = sim.shape[0]
    return float(torch.exp(beta * sim).sum() / (2 * beta * n * n))


def depth_states(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The (n, d) token representations of one input: the stack's input (depth 0), then the
    output of every block application in order (a looped stack's blocks once per loop; a
    DenseFormer's are the blocks' own outputs, before its depth-weighted averages)."""
    from ..models.common import Stack

    stacks = [m for m in model.modules() if isinstance(m, Stack)]
    arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
    if len(stacks) != 1:
        raise ValueError(f"architecture {arch!r} has {len(stacks)} block stacks; inspect clusters reads the token "
                         "representations of models with one (decoders, encoders, ViTs, looped or not)")
    stack = stacks[0]
    states: list[Tensor] = []
    handles = [stack.register_forward_pre_hook(lambda _m, args: states.append(args[0][0].detach().float().cpu()))]
    for block in stack.blocks:
        handles.append(block.register_forward_hook(lambda _m, _a, out: states.append(
            (out[0] if isinstance(out, tuple) else out)[0].detach().float().cpu())))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return states


def cluster_report(states: list[Tensor], *, threshold: float, beta: float, depths: list[int] | None = None) -> list[dict[str, float]]:
    """One record per state: its depth (`depths`, default 0, 1, ...), clusters at `threshold`,
    mean and minimum off-diagonal similarity, and the energy at inverse temperature `beta`."""
    out = []
    for depth, h in zip(depths or range(len(states)), states):
        sim = cosine_similarities(h)
        n = sim.shape[0]
        off = sim[~torch.eye(n, dtype=torch.bool)] if n > 1 else sim.flatten()
        out.append({"depth": depth, "clusters": count_clusters(sim, threshold), "mean_similarity": float(off.mean()),
                    "min_similarity": float(off.min()), "energy": interaction_energy(sim, beta)})
    return out


def shown_depths(count: int, panels: int = 8) -> list[int]:
    """Up to `panels` depths spread evenly from the first to the last (both included)."""
    if count <= panels:
        return list(range(count))
    return sorted({round(i * (count - 1) / (panels - 1)) for i in range(panels)})


def write_cluster_report(states: list[Tensor], out: Path, *, threshold: float, beta: float, title: str,
                         labels: list[str] | None = None, every: int = 1) -> dict[str, Any]:
    """clusters.json (the settings and the record of every `every`-th depth and the last),
    similarity.png (the similarity matrices at up to 8 of those depths) and clusters.png
    (clusters, similarities and energy against depth) in `out`; returns what the JSON holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = sorted({*range(0, len(states), every), len(states) - 1})
    records = cluster_report([states[d] for d in kept], threshold=threshold, beta=beta, depths=kept)
    report = {"title": title, "threshold": threshold, "beta": beta, "tokens": int(states[0].shape[0]),
              "width": int(states[0].shape[1]), "labels": labels, "every": every, "depths": records}
    fig, axes = plt.subplots(1, len(shown_depths(len(kept))), figsize=(2.2 * len(shown_depths(len(kept))), 2.6), squeeze=False)
    for ax, i in zip(axes[0], shown_depths(len(kept))):
        ax.imshow(cosine_similarities(states[kept[i]]).numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"depth {kept[i]}: {records[i]['clusters']} cl.", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: cosine similarity of the tokens", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "similarity.png")
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = [r["depth"] for r in records]
    a1.plot(x, [r["clusters"] for r in records], "-", color="tab:blue")
    a1.set_xlabel("depth (block applications)")
    a1.set_ylabel(f"clusters (similarity >= {threshold:g})")
    a1.grid(alpha=0.3)
    a2.plot(x, [r["mean_similarity"] for r in records], label="mean similarity")
    a2.plot(x, [r["min_similarity"] for r in records], label="min similarity")
    a2.set_xlabel("depth (block applications)")
    a2.grid(alpha=0.3)
    energy = a2.twinx()
    energy.plot(x, [r["energy"] for r in records], color="tab:red", ls="--", label=f"energy (beta {beta:g})")
    energy.set_ylabel("energy", color="tab:red")
    a2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "clusters.png")
    plt.close(fig)
    write_text(out / "clusters.json", json.dumps(report, indent=1) + "\n")
    return report
