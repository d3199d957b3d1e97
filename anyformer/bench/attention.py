"""Attention benchmark: time and peak memory against sequence length for every registered
attention kind and exact kernel, beside naive attention and torch's sdpa, in one run.

Each configuration runs in a fresh process (anyformer.bench.attention_run) so its peak memory
is its own. The primary figure (mode `kernel`) is the attention operation on ready q, k, v;
mode `module` measures whole attention modules, projections included (attention_run.py). A
configuration predicted (from the same method's smaller lengths) to exceed the
time or memory budget is skipped, and the reason printed. Results go to JSON and a log-log plot,
and a table of time and memory ratios against sdpa is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..nn.attention import ATTENTIONS, KERNELS
from ..plugins import child_environment

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def all_methods(mode: str = "module") -> list[str]:
    """Every exact kernel (inside multi-head attention), every attention kind other than plain
    'mha', sdpa given a dense sliding-window mask, and (module mode) the projections alone."""
    kernels = [f"mha[{k}]" for k in KERNELS.names()]
    kinds = [k for k in ATTENTIONS.names() if k != "mha"]
    return kernels + kinds + ["sdpa+dense-window"] + (["projections"] if mode == "module" else [])


@dataclass
class BenchConfig:
    """What to measure and the budgets that decide what to skip."""

    methods: list[str] = field(default_factory=lambda: all_methods("kernel"))
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    causal: list[bool] = field(default_factory=lambda: [True, False])
    passes: list[str] = field(default_factory=lambda: ["forward", "backward"])
    positional: str = "none"
    mode: str = "kernel"
    num_heads: int = 8
    head_dim: int = 64
    window: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_seconds: float = 30.0
    max_memory_gb: float = 12.0
    min_time: float = 1.0
    repeats: int = 3
    rounds: int = 1

    def validate(self) -> "BenchConfig":
        """Raise ValueError naming the first bad setting and what it must be; return self.
        (Method names are checked against `all_methods` by the command, not here.)"""
        import torch

        from ..nn.positional import POSITIONALS

        def positive_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        for name in ("methods", "lengths", "causal", "passes"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one")
        bad_lengths = [n for n in self.lengths if not positive_int(n)]
        if bad_lengths:
            raise ValueError(f"lengths must be positive integers, got {bad_lengths}")
        for name in ("num_heads", "head_dim", "window", "threads", "repeats", "rounds"):
            if not positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_seconds", "max_memory_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.min_time >= 0:
            raise ValueError(f"min_time must be >= 0, got {self.min_time!r}")
        checks = [
            ("causal", self.causal, [True, False]), ("passes", self.passes, ["forward", "backward"]),
            ("mode", [self.mode], ["kernel", "module"]), ("dtype", [self.dtype], ["float32", "bfloat16", "float16"]),
        ]
        for name, values, allowed in checks:
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name} {bad} not supported; choose from {allowed}")
        try:
            POSITIONALS.get(self.positional)
            device = torch.device(self.device)
        except (KeyError, RuntimeError) as e:
            raise ValueError(str(e)) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available here; use --device cpu")
        return self


def _predict(points: list[tuple[int, float]], n: int) -> float:
    """Extrapolate a figure to length n from the measured (length, value) points, assuming a
    power law whose exponent is fitted on the last two points (clamped to [1, 2]), else 2."""
    if not points:
        return 0.0
    (n1, v1) = points[-1]
    exponent = 2.0
    if len(points) >= 2:
        import math

        (n0, v0) = points[-2]
        if v0 > 0 and v1 > 0 and n1 != n0:
            exponent = min(2.0, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))
    return v1 * (n / n1) ** exponent


def run_one(spec: dict, timeout: float) -> dict:
    """Measure one configuration in a fresh Python process."""
    cmd = [sys.executable, "-m", "anyformer.bench.attention_run", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_environment())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode} (killed: out of memory?)"
        return {"error": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(cfg: BenchConfig, out_dir: Path, log=print) -> list[dict]:  # type: ignore[no-untyped-def]
    """Run every configuration; write attention.json (after every measurement, so an interrupted
    run keeps what it measured) and attention.png to `out_dir`.

    At each length every method runs back to back (lengths outer, methods inner), so a drift in
    the machine's speed over a long run falls on all methods alike instead of on whichever ran
    last; with `rounds` > 1 the whole sweep repeats, each measurement again in a fresh process,
    and a configuration keeps its best time (and its largest peak)."""
    cfg.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [(p, c) for p in cfg.passes for c in cfg.causal]
    rows: dict[tuple, dict] = {}
    history: dict[tuple, dict] = {}  # (method, causal, pass) -> measured points and stop reason
    total = len(groups) * len(cfg.lengths) * len(cfg.methods) * cfg.rounds
    started = time.perf_counter()
    done = 0

    def save() -> None:
        (out_dir / "attention.json").write_text(json.dumps({"config": asdict(cfg), "results": list(rows.values())}, indent=1))

    for round_ in range(cfg.rounds):
        for pass_, causal in groups:
            for n in sorted(cfg.lengths):
                for method in cfg.methods:
                    done += 1
                    key = (method, n, causal, pass_)
                    hist = history.setdefault((method, causal, pass_), {"times": [], "mems": [], "stop": ""})
                    spec = dict(
                        method=method, n=n, causal=causal, backward=pass_ == "backward", positional=cfg.positional,
                        mode=cfg.mode, num_heads=cfg.num_heads, head_dim=cfg.head_dim, window=cfg.window, dtype=cfg.dtype,
                        device=cfg.device, threads=cfg.threads, min_time=cfg.min_time, repeats=cfg.repeats,
                    )
                    where = f"[{done}/{total}] {method:22s} {pass_:8s} causal={causal!s:5s} n={n:6d}"
                    if round_ == 0:
                        row = {k: spec[k] for k in ("method", "mode", "n", "causal", "positional", "dtype", "device", "threads")}
                        row["pass"] = pass_
                        rows[key] = row
                        t_pred, m_pred = _predict(hist["times"], n), _predict(hist["mems"], n)
                        if not causal and method in ATTENTIONS and getattr(ATTENTIONS.get(method), "causal_only", False):
                            row["skipped"] = "causal-only attention kind"
                        elif hist["stop"]:
                            row["skipped"] = hist["stop"]
                        elif t_pred > cfg.max_seconds:
                            row["skipped"] = f"predicted {t_pred:.1f} s > budget {cfg.max_seconds:.0f} s"
                        elif m_pred > cfg.max_memory_gb * 2**30:
                            row["skipped"] = f"predicted {m_pred / 2**30:.1f} GiB > budget {cfg.max_memory_gb:.0f} GiB"
                        if "skipped" in row:
                            log(f"{where}  skipped: {row['skipped']}")
                            save()
                            continue
                    row = rows[key]
                    if "skipped" in row or "error" in row:
                        continue  # later rounds repeat only what the first one measured
                    res = run_one(spec, timeout=max(60.0, 4 * cfg.max_seconds * (1 + cfg.repeats)))
                    elapsed = time.perf_counter() - started
                    if "error" in res:
                        if round_ == 0:
                            row["error"] = res["error"]
                            hist["stop"] = f"failed at n={n}: {res['error']}"
                        log(f"{where}  error: {res['error']}")
                        save()
                        continue
                    if round_ == 0:
                        row |= res
                        row["round_times_s"] = [res["time_s"]]
                        hist["times"].append((n, res["time_s"]))
                        hist["mems"].append((n, max(res["peak_bytes"], 1.0)))
                    else:
                        row["round_times_s"].append(res["time_s"])
                        row["time_s"] = min(row["time_s"], res["time_s"])
                        row["peak_bytes"] = max(row["peak_bytes"], res["peak_bytes"])
                    err = f"  error vs exact {res['rel_error']:.3g}" if "rel_error" in res else ""
                    err += "  (timed as a whole module)" if res.get("mode") != spec["mode"] else ""
                    log(f"{where}  {res['time_s'] * 1e3:10.1f} ms  {res['peak_bytes'] / 2**20:9.1f} MiB{err}   (elapsed {elapsed:.0f} s)")
                    save()
    results = list(rows.values())
    save()
    plot(results, out_dir / "attention.png")
    for line in ratio_table(results):
        log(line)
    return results


REFERENCES = ("mha[sdpa]", "sdpa+dense-window")


def ratio_table(results: list[dict]) -> list[str]:
    """Lines of a table: each measured row's time and peak memory, and for each reference
    (sdpa; sdpa given the dense window mask) measured at the same length, causality and pass,
    the speed-up (reference time / time) and memory saving (reference peak / peak); and, for
    methods that approximate softmax attention, the mean relative error of their output. A row
    timed in another mode than the reference (a kind whose math lives in its layer hooks, timed
    as a whole module) is marked [module]."""
    ref = {(r["method"], r["n"], r["causal"], r["pass"]): r for r in results if "time_s" in r and r["method"] in REFERENCES}
    head = f"{'method':22s} {'pass':8s} {'causal':6s} {'n':>6s} {'time ms':>10s} {'peak MiB':>9s}"
    head += "".join(f"  {'x faster than ' + name:>28s} {'x less memory':>13s}" for name in REFERENCES)
    head += f"  {'rel error':>9s}"
    lines = [head]
    for r in sorted((r for r in results if "time_s" in r), key=lambda r: (r["pass"], r["causal"], r["n"], r["method"])):
        ours = ref.get((REFERENCES[0], r["n"], r["causal"], r["pass"]))
        name = r["method"] + (" [module]" if ours is not None and r.get("mode") != ours.get("mode") else "")
        line = f"{name:22s} {r['pass']:8s} {r['causal']!s:6s} {r['n']:6d} {r['time_s'] * 1e3:10.1f} {r['peak_bytes'] / 2**20:9.1f}"
        for name in REFERENCES:
            other = ref.get((name, r["n"], r["causal"], r["pass"]))
            if other is None:
                line += f"  {'-':>28s} {'-':>13s}"
            else:
                mem = other["peak_bytes"] / r["peak_bytes"] if r["peak_bytes"] > 0 else float("inf")
                line += f"  {other['time_s'] / r['time_s']:28.2f} {mem:13.1f}"
        line += f"  {r['rel_error']:9.3g}" if "rel_error" in r else f"  {'-':>9s}"
        lines.append(line)
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Log-log time and peak memory against length, one line per method/causality/pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    keys = sorted({(r["method"], r["causal"], r["pass"]) for r in results})
    for method, causal, pass_ in keys:
        pts = sorted((r["n"], r["time_s"], r["peak_bytes"]) for r in results
                     if (r["method"], r["causal"], r["pass"]) == (method, causal, pass_) and "time_s" in r)
        if not pts:
            continue
        label = f"{method} {'causal' if causal else 'full'} {pass_}"
        style = "-" if pass_ == "forward" else "--"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        axes[1].plot([p[0] for p in pts], [max(p[2], 1) / 2**20 for p in pts], style, marker="o", label=label)
    for ax, title in zip(axes, ("time per call (s)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
