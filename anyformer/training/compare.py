"""Equal-budget comparisons: a base run config, named variants (dotted overrides), seeds and a
budget (wall-clock minutes, training tokens, training FLOPs or steps), trained one run per
variant x seed through the ordinary trainer (`anyformer train` in a child process each, so a
crash or an out-of-memory stops only that run), then tabulated and plotted.

A spec (YAML):

    base: ../shakespeare-char.yaml     # a run config file (relative to the spec) or a mapping
    overrides: {train.seq_len: 128}    # optional, applied to the base for every variant
    variants:
      mha: {}
      linear: {model.attention.kind: linear}
    budget: {tokens: 2000000}          # one of minutes, tokens, flops, steps
    seeds: [0, 1]
    metric: val_loss                   # an evaluation metric of the task (default val_loss)
    parallel: 1                        # runs at once (each gets cpu_count / parallel threads,
                                       # and a GPU of its own when there are several)

Layout of the output folder: `VARIANT/seed_S/` (each run's folder, as `anyformer train` writes
it), `VARIANT/seed_S.log` (its output), `VARIANT/seed_S.json` (exit status, error, peak
memory), then `results.json`, `results.md` and the plots. Running the same comparison again
skips finished runs, resumes interrupted ones from their latest checkpoint (the trainer's
exact resume) and tries failed ones again.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, apply_overrides, load_yaml, read_yaml, save_yaml, to_dict
from ..plugins import child_environment
from .compare_report import write_results
from .config import RunConfig, run_config_from_dict

BUDGETS = ("minutes", "tokens", "flops", "steps")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_UNLIMITED_STEPS = 10**9


@dataclass
class CompareSpec:
    """A parsed comparison: the base config and one full run config per variant."""

    base: RunConfig
    variants: dict[str, RunConfig]
    overrides: dict[str, dict[str, Any]]
    budget: tuple[str, float]
    seeds: list[int]
    metric: str
    parallel: int = 1
    source: dict[str, Any] = field(default_factory=dict)

    def run_config(self, variant: str, seed: int, run_dir: Path) -> RunConfig:
        """The full config of one run: the variant with the seed, the budget and its folder."""
        kind, amount = self.budget
        budget: dict[str, Any] = {"train.max_steps": _UNLIMITED_STEPS, "train.max_minutes": None,
                                  "train.max_tokens": None, "train.max_flops": None}
        if kind == "steps":
            budget["train.max_steps"] = int(amount)
        else:
            budget[f"train.max_{kind}"] = int(amount) if kind == "tokens" else float(amount)
        return apply_overrides(self.variants[variant], {**budget, "train.seed": seed, "train.out_dir": str(run_dir), "train.samples": 0})


def _fail(msg: str) -> ConfigError:
    return ConfigError(f"compare spec: {msg}")


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a comparison spec; every problem is a ConfigError before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compare spec {str(path)!r} does not exist")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise _fail(f"{path} must hold a mapping with base, variants, budget and seeds")
    unknown = set(raw) - {"base", "overrides", "variants", "budget", "seeds", "metric", "parallel"}
    if unknown:
        raise _fail(f"unknown keys {sorted(unknown)}; valid: base, overrides, variants, budget, seeds, metric, parallel")
    base_src = raw.get("base")
    if isinstance(base_src, str):
        base_path = (path.parent / base_src) if not Path(base_src).is_absolute() else Path(base_src)
        if not base_path.is_file():
            raise _fail(f"base config {str(base_path)!r} does not exist")
        base = load_yaml(RunConfig, base_path)
    elif isinstance(base_src, dict):
        base = run_config_from_dict(base_src)
    elif base_src is None:
        from .config import default_run_config

        base = default_run_config()
    else:
        raise _fail("base must be a run config file (relative to the spec) or a mapping")
    common = raw.get("overrides") or {}
    if not isinstance(common, dict):
        raise _fail("overrides must be a mapping of dotted keys to values, e.g. {train.seq_len: 128}")
    try:
        base = apply_overrides(base, common)
    except ConfigError as e:
        raise _fail(f"overrides: {e}") from None
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise _fail("variants must be a non-empty mapping of names to dotted overrides, e.g. {mha: {}, linear: {model.attention.kind: linear}}")
    variants, overrides = {}, {}
    for name, ov in variants_raw.items():
        name = str(name)
        if not _NAME.match(name):
            raise _fail(f"variant name {name!r} must use letters, digits and _ . + - only (it names a folder)")
        ov = ov or {}
        if not isinstance(ov, dict):
            raise _fail(f"variant {name!r} must map dotted keys to values, got {ov!r}")
        try:
            cfg = apply_overrides(base, ov)
        except ConfigError as e:
            raise _fail(f"variant {name!r}: {e}") from None
        _check_same_evaluation(name, base, cfg)
        try:
            cfg.validate()
        except ConfigError as e:
            raise _fail(f"variant {name!r}: {e}") from None
        variants[name], overrides[name] = cfg, ov
    budget_raw = raw.get("budget")
    if not isinstance(budget_raw, dict) or len(budget_raw) != 1 or next(iter(budget_raw)) not in BUDGETS:
        raise _fail(f"budget must be one of {', '.join(BUDGETS)} with its amount, e.g. {{minutes: 3}} or {{tokens: 2000000}}")
    kind, amount = next(iter(budget_raw.items()))
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not math.isfinite(amount) or amount <= 0:
        raise _fail(f"budget {kind} must be a positive number, got {amount!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    metric = raw.get("metric", "val_loss")
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise _fail(f"parallel must be a positive integer, got {parallel!r}")
    return CompareSpec(base, variants, overrides, (kind, float(amount)), seeds, str(metric), parallel, raw)


def _check_same_evaluation(name: str, base: RunConfig, cfg: RunConfig) -> None:
    """A variant may change how its task draws training examples (the task's training_options,
    e.g. augmentation), never the task, its held-out data or how they are scored."""
    from ..tasks import TASKS

    if cfg.task.kind != base.task.kind:
        raise _fail(f"variant {name!r} changes the task ({base.task.kind!r} -> {cfg.task.kind!r}); every variant must "
                    "train the same task for the comparison to mean something")
    task = TASKS.get(cfg.task.kind)

    def options(c: RunConfig) -> dict[str, Any]:  # with the defaults filled in, where the task parses them
        parsed = getattr(task(c), "options", None)
        return to_dict(parsed) if dataclasses.is_dataclass(parsed) else to_dict(c.task.options)

    ours, theirs = options(cfg), options(base)
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k, _UNSET) != theirs.get(k, _UNSET))
    refused = [k for k in changed if k not in task.training_options]
    if refused:
        allowed = ", ".join(sorted(task.training_options)) or "none"
        raise _fail(f"variant {name!r} changes task.options {', '.join(refused)}, which change what task {cfg.task.kind!r} is "
                    f"evaluated on; variants may change only the options that shape training ({allowed})")


_UNSET = object()


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities go down; accuracies, BLEU and the like go up."""
    return any(word in metric for word in ("loss", "perplexity", "error", "bpc"))


# ----------------------------------------------------------------------------- running


@dataclass
class RunSlot:
    variant: str
    seed: int
    folder: Path

    @property
    def run_dir(self) -> Path:
        return self.folder / self.variant / f"seed_{self.seed}"

    @property
    def record(self) -> Path:
        return self.folder / self.variant / f"seed_{self.seed}.json"

    @property
    def log(self) -> Path:
        return self.folder / self.variant / f"seed_{self.seed}.log"


def _finished(slot: RunSlot) -> bool:
    if not slot.record.is_file():
        return False
    rec = json.loads(slot.record.read_text())
    return rec.get("status") == "ok"  # a failed run is tried again (its cause may have been fixed)


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest.json").is_file()


def _command(spec: CompareSpec, slot: RunSlot) -> list[str]:
    cmd = [sys.executable, "-m", "anyformer", "train", "--quiet"]
    if _has_checkpoint(slot.run_dir):
        return cmd + ["--resume", str(slot.run_dir)]
    if slot.run_dir.exists():  # killed before its first checkpoint: nothing to keep
        import shutil

        shutil.rmtree(slot.run_dir)
    cfg = spec.run_config(slot.variant, slot.seed, slot.run_dir)
    if cfg.train.threads is None and spec.parallel > 1:
        cfg = apply_overrides(cfg, {"train.threads": max(1, (os.cpu_count() or 1) // spec.parallel)})
    cfg_path = slot.folder / slot.variant / f"seed_{slot.seed}.yaml"
    save_yaml(cfg, cfg_path)
    return cmd + [str(cfg_path), "--out", str(slot.run_dir)]


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    for line in reversed(lines):
        if "error" in line.lower() or "Error" in line:
            return line[-500:]
    return lines[-1][-500:] if lines else "no output"


def _progress_step(slot: RunSlot) -> int:
    metrics = slot.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    return int(json.loads(lines[-1]).get("step", 0)) if lines else 0


def run_comparison(spec: CompareSpec, folder: str | Path, *, verbose: bool = True) -> dict[str, Any]:
    """Train every variant x seed not yet finished (resuming interrupted runs), then write
    and return the results."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_copy = folder / "spec.yaml"
    spec_copy.write_text(yaml.safe_dump(spec.source, sort_keys=False, allow_unicode=True))
    slots = [RunSlot(v, s, folder) for v in spec.variants for s in spec.seeds]
    todo = [s for s in slots if not _finished(s)]
    done_before = len(slots) - len(todo)
    say = print if verbose else (lambda *a, **k: None)
    say(f"compare: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(slots)} runs "
        f"({done_before} already finished), budget {spec.budget[0]} {spec.budget[1]:g} each, into {folder}")
    running: list[tuple[RunSlot, subprocess.Popen, float]] = []
    durations: list[float] = []
    # with several GPUs and several runs at once, each running run gets a GPU of its own
    free = gpus() if spec.parallel > 1 and len(gpus()) > 1 else []
    placing, device_of = bool(free), {}  # device_of: pid -> the GPU its run holds
    if placing:
        say(f"placing runs on GPUs {', '.join(free)} (one run per GPU at a time)")
    start = last_line = time.perf_counter()
    while todo or running:
        while todo and len(running) < spec.parallel and (free or not placing):
            slot = todo.pop(0)
            slot.log.parent.mkdir(parents=True, exist_ok=True)
            cmd = _command(spec, slot)
            env = {**child_environment(), "PYTHONUNBUFFERED": "1"}  # the training processes import the same plugins
            device = None
            if placing:
                device = free.pop(0)
                env["CUDA_VISIBLE_DEVICES"] = device
            with open(slot.log, "a") as log:
                log.write(f"$ {'CUDA_VISIBLE_DEVICES=' + device + ' ' if device else ''}{' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if device is not None:
                device_of[proc.pid] = device
            running.append((slot, proc, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            slot, proc, t0 = item
            returncode, peak = _reap(proc)
            if returncode is None:
                continue
            running.remove(item)
            device = device_of.pop(proc.pid, None)
            if device is not None:
                free.append(device)
            elapsed = time.perf_counter() - t0
            durations.append(elapsed)
            old = json.loads(slot.record.read_text()) if slot.record.is_file() else {}
            status = "ok" if returncode == 0 else "failed"
            rec = {"status": status, "returncode": returncode, "seconds": round(elapsed + old.get("seconds", 0.0), 1),
                   "peak_memory_mib": max(peak or 0.0, old.get("peak_memory_mib", 0.0)) or None}
            if device is not None:
                rec["cuda_visible_devices"] = device
            if status == "failed":
                rec["error"] = _last_error(slot.log)
            slot.record.write_text(json.dumps(rec))
            say(f"  {slot.variant} seed {slot.seed}: {status}" + (f" ({rec['error']})" if status == "failed" else "") +
                f" in {elapsed:.0f}s")
        tty = sys.stdout.isatty()
        if verbose and running and (tty or time.perf_counter() - last_line >= 30):
            last_line = time.perf_counter()
            finished = len(slots) - len(todo) - len(running)
            per_run = sum(durations) / len(durations) if durations else None
            left = (len(todo) + len(running)) * per_run / spec.parallel if per_run else None
            now = ", ".join(f"{s.variant}/seed {s.seed} step {_progress_step(s)}" for s, _, _ in running)
            eta = f"ETA {left / 60:.1f} min" if left is not None else "ETA after the first run"
            lead = "\r" if tty else ""
            print(f"{lead}[{finished}/{len(slots)} done] {now} | elapsed {(time.perf_counter() - start) / 60:.1f} min | {eta}   ",
                  end="" if tty else "\n", flush=True)
    if verbose and sys.stdout.isatty():
        print()
    results = collect_results(spec, folder)
    write_results(results, folder)
    say(f"wrote {folder / 'results.md'}, results.json and the plots")
    return results


def gpus() -> list[str]:
    """The CUDA devices runs can be placed on, as CUDA_VISIBLE_DEVICES entries (the visible
    ones when that variable is set); [] without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def _reap(proc: subprocess.Popen) -> tuple[int | None, float | None]:
    """(exit code, peak resident memory in MiB) of a finished child; (None, None) while it runs."""
    if not hasattr(os, "wait4"):
        code = proc.poll()
        return code, None
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None, None
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return proc.returncode, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux



# ----------------------------------------------------------------------------- results


def _mean_std(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "values": []}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def _run_summary(slot: RunSlot, metric: str, lower: bool) -> dict[str, Any]:
    from ..models.summary import summarize
    from . import checkpoint as ckpt

    rec = json.loads(slot.record.read_text()) if slot.record.is_file() else {"status": "not run"}
    out: dict[str, Any] = {"seed": slot.seed, "status": rec.get("status"), "error": rec.get("error"),
                           "peak_memory_mib": rec.get("peak_memory_mib"), "seconds": rec.get("seconds")}
    metrics = slot.run_dir / "metrics.jsonl"
    if rec.get("status") != "ok" or not metrics.is_file():
        return out
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval" and metric in r]
    train = [r for r in records if r["kind"] == "train"]
    if not evals:
        out.update(status="failed", error=f"no evaluation recorded metric {metric!r}")
        return out
    state = ckpt.read_state(ckpt.find_checkpoint(slot.run_dir, "latest"))
    step = int(state["step"])
    tokens_per_step = float(state["tokens"]) / step if step else 0.0
    cfg = load_yaml(RunConfig, slot.run_dir / "config.yaml")
    batch = cfg.train.batch_size
    per_example = max(1, round(tokens_per_step / batch)) if batch else 1
    summary = summarize(cfg.model, batch, per_example)
    rates = [r["tokens_per_s"] for r in train[3:] if "tokens_per_s" in r] or [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    pick = min if lower else max
    out.update(
        steps=step, tokens=step * tokens_per_step, parameters=summary.parameters,
        flops_per_token=summary.flops_per_token_training, tokens_per_s=sum(rates) / len(rates) if rates else None,
        final=evals[-1][metric], best=pick(r[metric] for r in evals),
        curve=[{"step": r["step"], "time": r["time"], "tokens": r["step"] * tokens_per_step,
                "flops": r["step"] * tokens_per_step * summary.flops_per_token_training, "value": r[metric]} for r in evals],
    )
    return out


def collect_results(spec: CompareSpec, folder: str | Path) -> dict[str, Any]:
    """Per variant: every seed's run summary and the mean and spread over seeds; each variant
    compared with the best one (a difference within the seed spread is not significant)."""
    folder = Path(folder)
    lower = lower_is_better(spec.metric)
    variants = []
    for name in spec.variants:
        runs = [_run_summary(RunSlot(name, seed, folder), spec.metric, lower) for seed in spec.seeds]
        ok = [r for r in runs if r["status"] == "ok"]
        entry: dict[str, Any] = {"name": name, "overrides": spec.overrides[name], "runs": runs,
                                 "status": "ok" if len(ok) == len(runs) else ("partial" if ok else "failed"),
                                 "errors": sorted({r["error"] for r in runs if r.get("error")})}
        if ok:
            entry.update(
                parameters=ok[0]["parameters"], flops_per_token=ok[0]["flops_per_token"],
                tokens_per_s=_mean_std([r["tokens_per_s"] for r in ok if r["tokens_per_s"] is not None])["mean"],
                peak_memory_mib=max((r["peak_memory_mib"] or 0.0) for r in ok) or None,
                final=_mean_std([r["final"] for r in ok]), best=_mean_std([r["best"] for r in ok]),
                steps=[r["steps"] for r in ok], tokens=_mean_std([r["tokens"] for r in ok])["mean"],
            )
        variants.append(entry)
    scored = [v for v in variants if "final" in v]
    if scored:
        key = (lambda v: v["final"]["mean"]) if lower else (lambda v: -v["final"]["mean"])
        best = min(scored, key=key)
        for v in scored:
            diff = abs(v["final"]["mean"] - best["final"]["mean"])
            spread = max(v["final"]["std"], best["final"]["std"])
            v["vs_best"] = v["final"]["mean"] - best["final"]["mean"]
            v["significant"] = None if v is best else (diff > spread if len(spec.seeds) > 1 else None)
            v["is_best"] = v is best
    return {"metric": spec.metric, "lower_is_better": lower, "budget": {spec.budget[0]: spec.budget[1]},
            "seeds": spec.seeds, "variants": variants}
