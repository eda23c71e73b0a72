"""The one training loop of every trainer: `fit(task, loop, ctx, path, ...)`.

A trainer says what is trained, as a `Task`: the model and its optimiser, one epoch's batches,
a batch's loss, the test metrics, how the checkpoint is written. The loop owns the rest, the
same for every trainer: epochs and steps, the learning rate (a function of the step and the
run's progress), the time budget, the history and its progress lines, the periodic resume
file (`<checkpoint>.resume.pt`) and resuming from it, the NaN/Inf and divergence checks, and
what an interruption leaves behind.

    progress = max(steps / total steps, seconds / (60 max_minutes))   # the lr follows it

The divergence rule: a checkpoint is written only when its test loss (the task's `test_key`,
lower is better) is finite and at most `DIVERGENCE_FACTOR` times as bad as each reference,
`loss <= ref + (DIVERGENCE_FACTOR - 1) * |ref|`. The references are the test loss of the
model before training, and, when --force replaces a checkpoint, that checkpoint's test loss
measured on the same data (when it loads as this kind of model). Otherwise the run ends with
a DivergedError (exit 2) and the checkpoint on disk is left as it is.

Resume is bitwise: the resume file holds the model, the optimiser, the task's `buffers` (an
EMA), the data generator now and at the start of the current epoch (its batches are drawn
again from that state), the step, the position in the epoch, the time spent and the history.

Example:
    >>> task = Task(model, opt, cosine(1e-3), plan, loss, evaluate, save, load, "test_bpd")
    >>> run = fit(task, Loop(epochs=20, save_every=1), ctx, "runs/made", same=cfg_dict,
    ...           generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ffsolve.checkpoint import (
    check_finite_loss,
    checkpoint_exists,
    load_train_state,
    save_train_state,
    train_state_path,
)
from ffsolve.errors import CheckpointError, DivergedError, FFSolveError
from ffsolve.progress import track

if TYPE_CHECKING:  # the trainers pass their run context; the loop only logs through it
    from ffsolve.experiments import RunContext

__all__ = [
    "DIVERGENCE_FACTOR",
    "Fit",
    "Loop",
    "Task",
    "cosine",
    "exponential",
    "fit",
    "shuffled_batches",
]

#: a test loss more than this many times as bad as its reference is never saved
DIVERGENCE_FACTOR = 2.0


def cosine(lr: float, lr_final: float = 0.0, warmup: int = 0) -> Callable[[int, float], float]:
    """lr(step, progress): linear warm-up over `warmup` steps, then a cosine from `lr` to
    `lr_final` over the run's progress in [0, 1]."""

    def at(step: int, progress: float) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return at


def exponential(lr: float, decay: float) -> Callable[[int, float], float]:
    """lr(step, progress) = lr * decay ** step (PixelCNN++'s schedule: it does not depend on
    the run's length, so a finished run can be extended)."""
    return lambda step, progress: lr * decay**step


def shuffled_batches(
    n: int, batch_size: int, device: torch.device | str = "cpu"
) -> Callable[[torch.Generator], list[Tensor]]:
    """A `Task.plan`: a new random order of n examples per epoch, cut into index batches."""

    def plan(g: torch.Generator) -> list[Tensor]:
        perm = torch.randperm(n, generator=g).to(device)
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]

    return plan


@dataclass
class Task:
    """What a trainer supplies to `fit`.

    Attributes:
        model, optimizer: what is trained (both saved in the resume file).
        lr: (steps done, progress in [0, 1]) -> the learning rate of the next step.
        plan: draws one epoch's batches from the data generator (an order, a shift) and
            returns them; a batch is whatever `loss` takes.
        loss: (batch, data generator) -> the scalar training loss (its noise drawn from the
            generator), with its graph.
        evaluate: model -> test metrics; `test_key` among them, when there is a test set.
        save: (the run so far, final) -> the checkpoint written (final: the last one; the
            others are the periodic ones of `Loop.checkpoint_each_save`).
        load: a checkpoint's path -> its model (that `--force` would replace).
        test_key: the test loss (lower is better) the divergence rule reads.
        train_key: the name of the mean training loss in the history.
        train_scale: the history's training loss is the loss's mean times this (a unit).
        steps_per_epoch: the denominator of progress (with `Loop.epochs`).
        clip: clip the gradients' global norm to this (0: off).
        after_step: called with the step count after every optimiser step (an EMA update).
        weights: the model as it ships, evaluated at the start and the end (default: model).
        buffers: tensors kept in the resume file and restored in place (an EMA).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int, float], float]
    plan: Callable[[torch.Generator], Sequence[Any]]
    loss: Callable[[Any, torch.Generator], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    save: Callable[[Fit, bool], Path]
    load: Callable[[str], nn.Module]
    test_key: str
    train_key: str = "train_loss"
    train_scale: float = 1.0
    steps_per_epoch: int | None = None
    clip: float = 0.0
    after_step: Callable[[int], None] | None = None
    weights: Callable[[], nn.Module] | None = None
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Loop:
    """How long to train and how often to record and save.

    Attributes:
        epochs, max_steps: stop after this many (None: no such limit).
        max_minutes: wall-clock budget (0: none); it counts an interrupted run's time too.
        save_every: epochs between periodic saves (0: none).
        save_every_minutes: minutes between periodic saves (0: none).
        log_every: steps between history rows (0: one row per epoch).
        evaluate_rows: measure the test metrics on every row (else at the start and the end).
        checkpoint_each_save: a periodic save writes the checkpoint too (before the resume
            file: a kill between the two resumes from one save earlier).
        keep_state: keep the resume file of a finished run (a schedule that does not depend
            on the run's length can then be extended with --resume and more epochs).
    """

    epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float = 0.0
    save_every: int = 0
    save_every_minutes: float = 0.0
    log_every: int = 0
    evaluate_rows: bool = True
    checkpoint_each_save: bool = False
    keep_state: bool = False


@dataclass
class Fit:
    """Where a run stands: the result of `fit`, and what `Task.save` reads.

    Attributes:
        history: rows of {epoch, step, <train_key>, <test metrics>, lr, elapsed_s}; row 0
            is the model before training.
        step, epoch, batch: optimiser steps, finished epochs, batches of the current epoch.
        epoch_batches: batches in the current epoch.
        elapsed_s: training seconds (an interrupted run's included).
        initial, final: test metrics before and after training.
        references: (what, test loss) the divergence rule compares with.
        checkpoint: the last checkpoint written.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    batch: int = 0
    epoch_batches: int = 0
    elapsed_s: float = 0.0
    initial: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    references: list[tuple[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None

    @property
    def epochs(self) -> float:
        """Epochs done, fractional mid-epoch."""
        part = self.batch / self.epoch_batches if self.epoch_batches else 0.0
        return self.epoch + part


def check_diverged(loss: float | None, references: list[tuple[str, float]], key: str) -> None:
    """DivergedError when `loss` is not finite or more than DIVERGENCE_FACTOR times as bad
    as a reference (None: no test set, nothing to judge)."""
    if loss is None:
        return
    for what, ref in references:
        if not math.isfinite(loss) or loss > ref + (DIVERGENCE_FACTOR - 1) * abs(ref):
            raise DivergedError(
                f"training diverged: test {key} {loss:.6g} is more than {DIVERGENCE_FACTOR:g}x "
                f"worse than {what} ({ref:.6g}); nothing saved (the checkpoint on disk, if any, "
                "is unchanged; try a smaller lr, or another save_to to keep both)"
            )


def fit(
    task: Task,
    loop: Loop,
    ctx: RunContext,
    path: str | Path,
    *,
    same: dict[str, Any],
    generator: torch.Generator,
    resume: bool = False,
) -> Fit:
    """Train `task` (see the module docstring), write its checkpoint at `path`.

    Args:
        task: the model, data, loss and evaluation.
        loop: how long, how often to record and save.
        ctx: the run's device and logger.
        path: the checkpoint's stem; the resume file is `<path>.resume.pt`.
        same: the settings a resumed run must share with the saved one.
        generator: the data generator (orders, noise), saved and restored with the state.
        resume: continue from the resume file when it exists (check_training_output has
            already refused a missing one where --resume insists).

    Returns:
        The finished run (`Fit`), its `checkpoint` written.

    Raises:
        DivergedError: a non-finite training loss, or a test loss the divergence rule
            refuses; nothing is saved then.
        KeyboardInterrupt: with `resume_from`, the resume file to continue from (or None).
    """
    state_path = train_state_path(path)
    # where the checkpoint goes is no setting of the training: a run started without save_to
    # resumes with the one its interruption names
    same = {k: v for k, v in same.items() if k != "save_to"}
    g, opt, model = generator, task.optimizer, task.model
    weights = task.weights or (lambda: model)
    run = Fit()
    plan_rng = g.get_state()
    if resume and state_path.is_file():
        st = load_train_state(state_path, model, opt, None, config=same, generator=g)
        ex = st["extra"]
        if "plan_rng" not in ex:
            raise CheckpointError(
                f"{state_path} was written by an older ffsolve's trainer; it cannot be resumed "
                "(train again with --force)"
            )
        run = Fit(
            history=ex["history"],
            step=ex["step"],
            epoch=st["epoch"],
            batch=ex["batch"],
            elapsed_s=ex["elapsed_s"],
            initial=ex["initial"],
            references=[tuple(r) for r in ex["references"]],
        )
        for name, saved in ex["buffers"].items():
            for b, s in zip(task.buffers[name], saved, strict=True):
                b.copy_(s)
        plan_rng = ex["plan_rng"]
        ctx.log(
            f"  resumed from {state_path}: epoch {run.epoch}, step {run.step}, "
            f"{run.elapsed_s:.0f} s"
        )
    else:
        if resume:
            ctx.log(f"  no resumable state at {state_path}: starting afresh")
        run.initial = task.evaluate(weights())
        run.history.append(
            {"epoch": 0, "step": 0, task.train_key: None, **run.initial, "elapsed_s": 0.0}
        )
        ctx.log(f"  epoch   0 (initial)  {_metrics(run.initial)}")
        if task.test_key in run.initial:
            run.references.append(("the model before training", run.initial[task.test_key]))
            if checkpoint_exists(path):  # --force replaces it
                old = _replaced(task, path, ctx)
                if old is not None:
                    run.references.append((f"the checkpoint it would replace, {path}", old))
    budget = 60 * loop.max_minutes if loop.max_minutes else math.inf
    total = [
        n
        for n in (
            loop.max_steps,
            loop.epochs and task.steps_per_epoch and loop.epochs * task.steps_per_epoch,
        )
        if n
    ]
    t0 = time.perf_counter() - run.elapsed_s
    last_save = time.perf_counter()

    def progress() -> float:
        return max(run.step / min(total) if total else 0.0, run.elapsed_s / budget)

    def finished() -> bool:
        return bool(
            (loop.max_steps and run.step >= loop.max_steps)
            or (loop.epochs and run.epoch >= loop.epochs)
            or run.elapsed_s >= budget
        )

    def save(final: bool) -> None:
        if final or loop.checkpoint_each_save:
            check_diverged(run.final.get(task.test_key), run.references, task.test_key)
            run.checkpoint = task.save(run, final)
        if not final or loop.keep_state:
            extra = {
                "step": run.step,
                "batch": run.batch,
                "plan_rng": plan_rng,
                "elapsed_s": run.elapsed_s,
                "history": run.history,
                "initial": run.initial,
                "references": [list(r) for r in run.references],
                "buffers": task.buffers,
            }
            save_train_state(
                state_path, model, opt, None, run.epoch, extra, config=same, generator=g
            )

    window, count, first, evaluated = None, 0, run.step, False
    try:
        while not finished():
            if run.batch == 0:
                plan_rng = g.get_state()
                plan = task.plan(g)
            else:  # resumed mid-epoch: the same batches, then the generator as it was
                now = g.get_state()
                g.set_state(plan_rng)
                plan = task.plan(g)
                g.set_state(now)
            run.epoch_batches = len(plan)
            model.train()
            batches = range(run.batch, len(plan))
            for b in track(batches, desc=f"epoch {run.epoch + 1}", unit="batch", lines=False):
                lr = task.lr(run.step, progress())
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = task.loss(plan[b], g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if task.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
                opt.step()
                run.step, run.batch = run.step + 1, b + 1
                if task.after_step is not None:
                    task.after_step(run.step)
                window = loss.detach() if window is None else window + loss.detach()
                count += 1
                run.elapsed_s = time.perf_counter() - t0
                epoch_end = run.batch == len(plan)
                if epoch_end:
                    run.epoch, run.batch = run.epoch + 1, 0
                due = bool(loop.save_every_minutes) and (
                    time.perf_counter() - last_save > 60 * loop.save_every_minutes
                )
                done = finished()
                if (
                    (loop.log_every and run.step % loop.log_every == 0)
                    or due
                    or done
                    or (epoch_end and not loop.log_every)
                ):
                    # one host read per row: a non-finite loss stops here, before any save
                    mean = float(window) / count * task.train_scale
                    check_finite_loss(mean, f"steps {first + 1}-{run.step} (lr {lr:.3g})")
                    row = {
                        "epoch": run.epoch if run.batch == 0 else round(run.epochs, 4),
                        "step": run.step,
                        task.train_key: mean,
                    }
                    evaluated = loop.evaluate_rows
                    if evaluated:
                        run.final = task.evaluate(weights())
                        row.update(run.final)
                        model.train()
                    row.update(lr=lr, elapsed_s=run.elapsed_s)
                    run.history.append(row)
                    window, count, first = None, 0, run.step
                    ctx.log(
                        f"  epoch {row['epoch']:>6}  step {run.step:6d}  {task.train_key} "
                        f"{mean:.5f}  {_metrics(row if evaluated else {})}lr {lr:.3g}  "
                        f"({run.elapsed_s:.0f} s)"
                    )
                    periodic = loop.save_every and epoch_end and run.epoch % loop.save_every == 0
                    if (due or periodic) and not done:
                        save(final=False)
                        last_save = time.perf_counter()
                if done:
                    break
        if not evaluated:  # the end's test metrics, of the weights as they ship
            run.final = task.evaluate(weights())
            if run.final:
                ctx.log(f"  final  {_metrics(run.final)}")
        save(final=True)
    except KeyboardInterrupt as e:
        # the command line says how to continue
        e.resume_from = state_path if state_path.is_file() else None  # type: ignore[attr-defined]
        raise
    if not loop.keep_state:
        state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    return run


def _metrics(values: dict[str, Any]) -> str:
    return "".join(f"{k} {v:.5f}  " for k, v in values.items() if k.startswith(("test", "valid")))


def _replaced(task: Task, path: str | Path, ctx: RunContext) -> float | None:
    """The test loss of the checkpoint at `path` on this run's test data, or None when it is
    not a model this run can evaluate (another kind, size or data shape)."""
    try:
        old = task.load(str(path)).to(ctx.device)
        value = task.evaluate(old).get(task.test_key)
    except (FFSolveError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        ctx.log(f"  {path} is not comparable with this run ({type(e).__name__}); not a reference")
        return None
    ctx.log(f"  {path}: test {task.test_key} {value:.5f} (the checkpoint --force replaces)")
    return value
