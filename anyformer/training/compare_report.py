"""The results of a comparison (anyformer.training.compare) as a Markdown table, JSON and
plots: the metric against wall time, tokens and FLOPs (mean over seeds, the seed range as a
band) and quality against throughput with the Pareto front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import save_figure, write_text


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def results_markdown(results: dict[str, Any]) -> str:
    """The comparison table (mean +- standard deviation over seeds)."""
    m = results["metric"]
    kind, amount = next(iter(results["budget"].items()))
    better = "lower" if results["lower_is_better"] else "higher"
    lines = [f"Budget per run: {amount:g} {kind}; seeds {results['seeds']}; metric `{m}` ({better} is better).", "",
             f"| variant | parameters | training FLOPs/token | tokens/s | peak memory (MiB) | steps | final {m} | best {m} | vs best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        if "final" not in v:
            lines.append(f"| {v['name']} | failed: {'; '.join(v['errors'])} | | | | | | | |")
            continue
        f, b = v["final"], v["best"]
        spread = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}" if len(s["values"]) > 1 else f"{s['mean']:.4f}"  # noqa: E731
        if v["is_best"]:
            vs = "best"
        elif v["significant"] is None:
            vs = f"{v['vs_best']:+.4f} (one seed: no spread)"
        else:
            vs = f"{v['vs_best']:+.4f}" + ("" if v["significant"] else " (not significant)")
        steps = "/".join(str(s) for s in sorted(set(v["steps"])))
        note = f" (failed seeds: {'; '.join(v['errors'])})" if v["status"] == "partial" else ""
        lines.append(f"| {v['name']}{note} | {v['parameters'] / 1e6:.2f}M | {v['flops_per_token'] / 1e6:.1f}M | "
                     f"{_fmt(v['tokens_per_s'], 0)} | {_fmt(v['peak_memory_mib'], 0)} | {steps} | {spread(f)} | {spread(b)} | {vs} |")
    lines += ["", "A difference smaller than the larger standard deviation over seeds of the two variants is marked not significant."]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], folder: Path) -> None:
    """results.json, results.md and the plots."""
    write_text(folder / "results.json", json.dumps(results, indent=1))
    write_text(folder / "results.md", results_markdown(results))
    plot_results(results, folder)


def plot_results(results: dict[str, Any], folder: Path) -> list[Path]:
    """The metric against wall time, tokens and training FLOPs (one line per variant: the
    mean over seeds, the band from the lowest to the highest seed), and quality against
    speed with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = results["metric"]
    paths = []
    cmap = plt.get_cmap("tab10" if len(results["variants"]) <= 10 else "tab20")
    styles = ["-", "--", "-.", ":"]
    for axis, label in (("time", "wall time (s)"), ("tokens", "training tokens"), ("flops", "training FLOPs")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, v in enumerate(results["variants"]):
            curves = [r["curve"] for r in v["runs"] if r.get("curve")]
            if not curves:
                continue
            grid = np.unique(np.concatenate([[p[axis] for p in c] for c in curves]))
            ys = np.stack([np.interp(grid, [p[axis] for p in c], [p["value"] for p in c], right=np.nan) for c in curves])
            mean = np.nanmean(ys, 0)
            line, = ax.plot(grid, mean, label=v["name"], color=cmap(i % cmap.N), linestyle=styles[(i // cmap.N) % len(styles)])
            if len(curves) > 1:
                ax.fill_between(grid, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel(m)
        ax.set_title(f"{m} against {label} (band: seed range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(results["variants"]) > 6 else 1)
        fig.tight_layout()
        path = save_figure(fig, folder / f"{m}_vs_{axis}.png")
        plt.close(fig)
        paths.append(path)
    points = [(v["tokens_per_s"], v["final"]["mean"], v["name"]) for v in results["variants"] if "final" in v and v["tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lower = results["lower_is_better"]
    front = [p for p in points if not any(q[0] >= p[0] and (q[1] <= p[1] if lower else q[1] >= p[1]) and q != p for q in points)]
    for x, y, name in points:
        ax.scatter([x], [y], color="tab:blue" if (x, y, name) in front else "tab:gray")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(front) > 1:
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:blue", alpha=0.5, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("training throughput (tokens/s)")
    ax.set_ylabel(f"final {m}")
    ax.set_title("quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = save_figure(fig, folder / "pareto.png")
    plt.close(fig)
    paths.append(path)
    return paths
