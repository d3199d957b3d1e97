"""The training loop, one for every task (anyformer/tasks): optimiser, schedule, evaluation,
checkpoints, data-parallel processes, progress and metrics; the task brings data, loss and
metrics.

Legend: `b` batch, `n` length, `V` vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import save_yaml
from ..distributed import DistEnv, broadcast_float, mean_across, setup
from ..dtypes import DTYPES
from ..models.builders import build_model, count_parameters
from ..models.summary import summarize
from ..tasks import TASKS
from ..tokenizers import save_tokenizer
from . import checkpoint as ckpt
from . import parallel
from .config import RunConfig, TrainConfig
from .metrics import MetricsLog, Progress, format_time, matmul_peak_flops, plot_losses, read_metrics
from .optim import WARMUP_FRACTION, build_optimizer, lr_at, set_lr, warmup_of


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    step: int
    val_loss: float
    best_val_loss: float
    losses: list[float]
    seconds: float
    samples: list[str]


def _unique_dir(path: Path) -> Path:
    if not path.exists() or not any(path.iterdir()):
        return path
    i = 2
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


def _rng_state(sampler: Any, device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "data": sampler.state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], sampler: Any, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def step_cap(t: TrainConfig, tokens_per_step: int, flops_per_token: float) -> int:
    """The most steps a run may take: train.max_steps, lowered by train.max_tokens (the steps
    whose tokens reach it, rounded to the nearest step) and train.max_flops (likewise, at the
    model's training FLOPs per token)."""
    cap = t.max_steps
    if t.max_tokens is not None:
        cap = min(cap, max(1, round(t.max_tokens / tokens_per_step)))
    if t.max_flops is not None:
        cap = min(cap, max(1, round(t.max_flops / (tokens_per_step * flops_per_token))))
    return cap


class Trainer:
    """Runs one training job described by a RunConfig (fresh, or resumed from a run folder).

    Args:
        cfg: the run's config (model.vocab_size is set from the tokenizer).
        run_dir: output folder; resume: continue the run in this folder from its latest checkpoint.
        start_time: perf_counter() when the command started (the wall-clock budget counts from it).
        verbose: print progress (rank 0 only in any case).
    """

    def __init__(
        self, cfg: RunConfig, *, run_dir: str | Path | None = None, resume: bool = False,
        start_time: float | None = None, verbose: bool = True,
    ) -> None:
        self.start_time = start_time if start_time is not None else time.perf_counter()
        cfg.validate()
        t = cfg.train
        self.env = setup(t.device, group=t.parallel == "fsdp")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.verbose = verbose and self.env.is_main
        self.progress = Progress()
        self.task = TASKS.get(cfg.task.kind)(cfg)
        self.data = self._prepare_data()
        self.cfg = dataclasses.replace(cfg, model=self.task.model_config(cfg.model, self.data))
        self.task.cfg = self.cfg
        if t.batch_size % (self.env.world * t.grad_accum):
            raise ValueError(
                f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum = "
                f"{self.env.world} x {t.grad_accum}"
            )
        torch.manual_seed(t.seed)
        self.model = build_model(self.cfg.model).to(self.env.device)
        per_example = self.task.tokens_per_example()
        self.tokens_per_step = t.batch_size * per_example
        self.flops_per_token = summarize(self.model, t.batch_size, per_example).flops_per_token_training
        self.n_params = count_parameters(self.model)
        # sharding replaces the parameters, so the optimizer is built on the wrapped model
        self.forward = parallel.wrap(self.model, t, self.env)
        self.sharded = parallel.is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, t)
        self.sampler = self.task.sampler(self.data, t.seed)
        self.step_cap = step_cap(t, self.tokens_per_step, self.flops_per_token)
        self.step, self.horizon = 0, self.step_cap
        self._noticed: set[str] = set()
        self.finished, self.final_val = False, None  # a resumed run that had already reached its end
        self.best_val, self.elapsed_before = math.inf, 0.0
        self.run_dir = Path(run_dir or t.out_dir)
        if not resume:  # restarted by torchrun --max-restarts: continue this launch's run
            found = restarted_run(self.run_dir, self.cfg)
            if found is not None:
                self.run_dir, resume = found, True
        self.resumed = resume
        if resume:
            self._resume()
        elif self.env.is_main:
            self.run_dir = _unique_dir(self.run_dir)
        self.run_dir = Path(broadcast_path(str(self.run_dir), self.env))
        board = self.run_dir / "tensorboard" if self.cfg.train.tensorboard and self.env.is_main else None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", board, first_step=self.step)

    # ----------------------------------------------------------------- setup

    def _prepare_data(self) -> Any:
        if self.env.distributed:  # rank 0 builds the data cache first; the others then read it
            import torch.distributed as dist

            if self.env.is_main:
                data = self.task.prepare(self.env)
            dist.barrier()
            if not self.env.is_main:
                data = self.task.prepare(self.env)
            return data
        return self.task.prepare(self.env)

    def _resume(self) -> None:
        folder = ckpt.find_checkpoint(self.run_dir, "latest")
        state = ckpt.read_state(folder)
        if ckpt.is_sharded_checkpoint(folder):  # written by an FSDP run, at any number of processes
            rng = ckpt.load_sharded_training_state(folder, self.model, self.optimizer)
        elif self.sharded:
            raise ckpt.CheckpointError(
                f"{str(folder)!r} is a single-file checkpoint (a ddp or one-process run); resume it with "
                "train.parallel=ddp (sharded checkpoints, written by fsdp runs, resume under either)"
            )
        else:
            ckpt.load_weights(self.model, folder)
            rng = ckpt.load_training_state(folder, self.optimizer)
        _set_rng_state(rng, self.sampler, self.env.device)
        self.step = int(state["step"])
        # a step-based run follows max_steps (which the resume may raise); a timed run keeps its estimate
        self.horizon = int(state["horizon"]) if self.cfg.train.max_minutes else self.step_cap
        self.best_val = float(state.get("best_val_loss", math.inf))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.final_val = state.get("val_loss")
        t = self.cfg.train
        if self.step >= self.horizon and t.max_minutes is not None and self.elapsed_before < t.max_minutes * 60 - 10:
            self.horizon = self.step_cap  # a larger time budget than the run had: plan again from the clock
        self.finished = self.step >= self.horizon
        if self.finished:  # nothing to train: leave the folder exactly as it is
            self._say(f"{self.run_dir} already finished at step {self.step} (of {self.horizon}); nothing to do. "
                      "Raise train.max_steps (or train.max_minutes, max_tokens, max_flops) to train further")
            return
        metrics = self.run_dir / "metrics.jsonl"
        if self.env.is_main and metrics.is_file():  # drop records logged after this checkpoint
            keep = [r for r in read_metrics(metrics) if r.get("step", 0) <= self.step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._say(f"resumed {self.run_dir} from {folder.name} (step {self.step})")

    def _say(self, text: str) -> None:
        if self.verbose:
            self.progress.message(text)

    # ----------------------------------------------------------------- loop

    def train_step(self) -> float:
        """One optimizer step on one global batch; returns the batch's mean loss."""
        t, env = self.cfg.train, self.env
        per = t.batch_size // env.world
        indices = self.sampler.draw(t.batch_size)[env.rank * per : (env.rank + 1) * per]
        total = torch.zeros((), device=env.device)
        dtype = DTYPES[t.dtype]
        batches = [tuple(a.to(env.device, non_blocking=True) for a in self.sampler.batch(part)) for part in indices.chunk(t.grad_accum)]
        # a task whose batches hold different numbers of predictions (masked positions) weights
        # each chunk by its count over the global total, so that any split over processes and
        # micro-steps gives the loss of the whole batch; otherwise chunks weigh the same
        counts = [self.task.count(b) for b in batches]
        weighted = counts[0] is not None
        if weighted:
            global_count = mean_across(torch.stack(counts).sum().double(), env) * env.world
        for i, batch in enumerate(batches):
            # DDP reduces the gradients of the last micro-step only; FSDP reduce-scatters every
            # micro-step (sharded gradients accumulate, nothing unsharded is kept)
            sync = i == t.grad_accum - 1 or not env.distributed or self.sharded
            with contextlib.nullcontext() if sync else self.forward.no_sync():  # type: ignore[operator]
                loss = self.task.loss(self.forward, batch, dtype)
                loss = loss * (counts[i] * env.world / global_count).float() if weighted else loss / t.grad_accum
                loss.backward()
            total += loss.detach()
        # the gradient norm (before clipping) is logged; max_norm inf leaves the gradients alone
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        self.grad_norm = float(parallel.local(norm))
        lr = lr_at(self.step, t, self.horizon)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(mean_across(total, env))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _final_reserve(self, step_time: float, eval_time: float) -> float:
        """Seconds to keep for the final evaluation, checkpoint and samples."""
        t = self.cfg.train
        evaluation = eval_time or step_time * t.eval_batches / 2  # forward-only batches
        # a cached decoding step for `samples` sequences costs well under 1/50 of a training step
        # on batch_size x seq_len tokens (a generous bound: small batches use the CPU poorly)
        sampling = self.task.sample_tokens() * step_time / 50 if t.samples else 0.0
        return 1.5 * evaluation + sampling + 5.0

    def _update_horizon(self, step_time: float, eval_time: float) -> None:
        """With a wall-clock budget: the step count expected to fit in the time left."""
        t = self.cfg.train
        if t.max_minutes is None:
            return
        left = t.max_minutes * 60 - self._elapsed() - self._final_reserve(step_time, eval_time)
        per_step = step_time + eval_time / self.eval_interval()
        horizon = self.step + max(0, int(left / per_step))
        # rank 0 decides, so that every process stops at the same step
        self.horizon = int(broadcast_float(float(min(horizon, self.step_cap)), self.env))

    def eval_interval(self) -> int:
        """Steps between evaluations: train.eval_every; in a wall-clock budgeted run planned to
        fewer than 4 x eval_every steps, less, so that it still evaluates about 4 times (the
        last step always does). A step-budgeted run evaluates as configured."""
        t = self.cfg.train
        return t.eval_every if t.max_minutes is None else max(1, min(t.eval_every, self.horizon // 4))

    def _notice_schedule(self) -> None:
        """Say once when the plan shortened the warmup or the evaluation interval."""
        t = self.cfg.train
        warmup, interval = warmup_of(t, self.horizon), self.eval_interval()
        changes = []
        if warmup < t.warmup_steps and "warmup" not in self._noticed:
            changes.append(f"warmup {warmup} steps instead of train.warmup_steps={t.warmup_steps} "
                           f"(at most {WARMUP_FRACTION:.0%} of the ~{self.horizon} planned)")
            self._noticed.add("warmup")
        if interval < t.eval_every and "eval" not in self._noticed:
            changes.append(f"evaluating every {interval} steps instead of train.eval_every={t.eval_every}, to get several validation points")
            self._noticed.add("eval")
        if changes:
            self._say("short run: " + "; ".join(changes))

    def save(self, val_loss: float | None = None) -> None:
        """Write a checkpoint (rank 0); `val_loss` decides whether it is the best so far."""
        is_best = val_loss is not None and val_loss < self.best_val
        if is_best:
            self.best_val = val_loss  # type: ignore[assignment]
        state = {"horizon": self.horizon, "best_val_loss": self.best_val, "elapsed": self._elapsed(),
                 "val_loss": val_loss, "tokens": self.step * self.tokens_per_step}
        if self.sharded:  # every process writes its shards
            ckpt.save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, _rng_state(self.sampler, self.env.device),
                                         state, keep_last=self.cfg.train.keep_last, is_best=is_best)
            return
        if not self.env.is_main:
            return
        ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, _rng_state(self.sampler, self.env.device),
                             state, keep_last=self.cfg.train.keep_last, is_best=is_best)

    def fit(self) -> TrainResult:
        """Train until the horizon (or the time budget), evaluating and checkpointing on the way.

        A new run that fails (or is interrupted) before its first checkpoint leaves no folder
        behind, so the same command can simply be run again; one that has a checkpoint keeps it
        and says how to resume."""
        fresh = self.env.is_main and not self.resumed
        existed = self.run_dir.exists()
        try:
            return self._fit()
        except BaseException:
            if fresh:
                self._after_failure(existed)
            raise

    def _after_failure(self, existed: bool) -> None:
        import shutil

        self.metrics.close()
        try:
            ckpt.find_checkpoint(self.run_dir)
            kept = True
        except (FileNotFoundError, ckpt.CheckpointError):
            kept = False
        if kept:
            print(f"the run so far is kept in {self.run_dir}; continue it with: anyformer train --resume {self.run_dir}",
                  file=sys.stderr)
        elif existed:  # an empty folder given as --out: emptied again
            for p in self.run_dir.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _fit(self) -> TrainResult:
        t, env = self.cfg.train, self.env
        if self.finished:
            val = float(self.final_val) if self.final_val is not None else math.nan
            return TrainResult(self.run_dir, self.step, val, self.best_val, [], self.elapsed_before, [])
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.run_dir / "config.yaml")
            if _launch_id() is not None:
                ckpt.write_json_atomic(self.run_dir / "launch.json", {"torchelastic_run_id": _launch_id()})
            if self.data.tokenizer is not None:  # a task on images has none
                save_tokenizer(self.data.tokenizer, self.run_dir / "tokenizer.json")
        n_params = self.n_params
        fpt, tokens_per_step = self.flops_per_token, self.tokens_per_step
        peak = matmul_peak_flops(env.device, DTYPES[t.dtype]) * env.world
        self._say(
            f"model {n_params / 1e6:.2f}M parameters | task {self.cfg.task.kind} | {self.task.describe(self.data)} | "
            f"{env.world} process(es) on {env.device}{' (FSDP)' if self.sharded else ''} | "
            f"matmul peak {peak / 1e9:.0f} GFLOP/s ({t.dtype})"
        )
        self.model.train()
        losses: list[float] = []
        step_time, eval_time = None, 0.0
        val_loss, last_eval = math.nan, -1
        evaluated_at = self.step  # a resumed run's checkpoint was written at an evaluation
        window_t0, window_steps = time.perf_counter(), 0
        while self.step < self.horizon:
            t0 = time.perf_counter()
            loss = self.train_step()
            losses.append(loss)
            window_steps += 1
            dt = time.perf_counter() - t0
            if self.step > 3:
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            if env.is_main:
                self.metrics.write(kind="train", step=self.step, loss=loss, lr=lr_at(self.step - 1, t, self.horizon),
                                   grad_norm=round(self.grad_norm, 6), tokens_per_s=round(tokens_per_step / dt, 1),
                                   time=round(self._elapsed(), 3))
            done = self.step >= self.horizon
            # evaluate every eval_interval() steps since the last evaluation (the interval of a
            # timed run shrinks as its plan firms up; a multiple of it could be skipped)
            if self.step - evaluated_at >= self.eval_interval() or done:
                evaluated_at = self.step
                e0 = time.perf_counter()
                scores = self.task.evaluate(self.model, self.data, env)
                val_loss = scores["val_loss"]
                last_eval = self.step
                eval_time = time.perf_counter() - e0
                self.save(val_loss)
                if env.is_main:
                    self.metrics.write(kind="eval", step=self.step, **scores, time=round(self._elapsed(), 3))
                self._say(f"step {self.step}: val loss {val_loss:.4f} (best {self.best_val:.4f}) | eval {eval_time:.1f}s")
                window_t0, window_steps = time.perf_counter(), 0
            if step_time is not None and (self.step % t.log_every == 0 or self.step == 5):
                self._update_horizon(step_time, eval_time)
                self._notice_schedule()
            if self.verbose and (self.step % t.log_every == 0 or done) and window_steps:
                rate = window_steps * tokens_per_step / (time.perf_counter() - window_t0)
                eta = (self.horizon - self.step) * (step_time or 0.0)
                mfu = rate * fpt / peak
                self.progress.update(
                    f"step {self.step}/{self.horizon} | loss {loss:.4f} | lr {lr_at(self.step - 1, t, self.horizon):.2e} | "
                    f"{rate:,.0f} tok/s | MFU {100 * mfu:.1f}% | elapsed {format_time(self._elapsed())} | ETA {format_time(eta)}"
                )
        if last_eval != self.step:  # the clock moved the horizon below this step: evaluate the end state
            scores = self.task.evaluate(self.model, self.data, env)
            val_loss = scores["val_loss"]
            self.save(val_loss)
            if env.is_main:
                self.metrics.write(kind="eval", step=self.step, **scores, time=round(self._elapsed(), 3))
        samples = self.samples() if t.samples else []
        self.metrics.close()
        if env.is_main and (self.run_dir / "metrics.jsonl").is_file():
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if env.distributed or self.sharded:  # leave together: no process tears the group down under another
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(self.run_dir, self.step, val_loss, self.best_val, losses, self._elapsed(), samples)

    def samples(self) -> list[str]:
        """The task's end-of-run samples (continuations of task.options.sample_prompt for a causal LM),
        made by rank 0 (a sharded model is gathered into a whole copy there first; every process
        takes part in the gathering). Other processes return []."""
        model: nn.Module | None = self.model
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            whole = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            model = None
            if self.env.is_main:
                model = build_model(self.cfg.model)
                model.load_state_dict(whole)
                model.to(self.env.device)
        return self.task.samples(model, self.data) if self.env.is_main and model is not None else []


def _launch_id() -> str | None:
    """The torchrun launch this process belongs to (TORCHELASTIC_RUN_ID), or None."""
    import os

    return os.environ.get("TORCHELASTIC_RUN_ID")


def restarted_run(out_dir: Path, cfg: RunConfig) -> Path | None:
    """When torchrun restarted the workers of a launch (TORCHELASTIC_RESTART_COUNT > 0, after a
    process died), the run folder this launch was training: `out_dir` or one of its numbered
    siblings (`out_dir-2`, ...) whose launch.json names this launch and whose config is this
    run's, with a complete checkpoint; the most recently written one. None otherwise (a first
    attempt, or a restart before the first checkpoint: the run starts afresh)."""
    import os

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or _launch_id() is None:
        return None
    from ..config import load_yaml

    candidates = [out_dir, *out_dir.parent.glob(f"{out_dir.name}-*")] if out_dir.parent.is_dir() else []
    found = []
    for folder in candidates:
        try:
            same_launch = json.loads((folder / "launch.json").read_text()).get("torchelastic_run_id") == _launch_id()
            if not same_launch or load_yaml(RunConfig, folder / "config.yaml") != cfg:
                continue
            found.append((ckpt.find_checkpoint(folder, "latest").stat().st_mtime, folder))
        except (OSError, ValueError, ckpt.CheckpointError):
            continue
    return max(found)[1] if found else None


def broadcast_path(path: str, env: DistEnv) -> str:
    """Rank 0's run folder on every process."""
    if not env.distributed:
        return path
    import torch.distributed as dist

    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]
