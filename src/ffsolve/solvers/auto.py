"""method="auto": measure what each method would cost on this problem, then solve with the
cheapest, saying why.

A parallel method pays when the sweeps it needs cost less than the sequential loop's T steps;
both depend on the model, the batch, the device and how fast the certified prefix grows, which
no rule of thumb knows in advance (measured here: from 113x to 0.04x). So `auto` measures:

- the sequential step: the problem's stepper for a few steps (its cost times T predicts the
  loop);
- each candidate method that applies to the problem (jacobi, a sliding window, and for a
  first-order problem picard, quasi_newton and anderson; scan for a linear one): one sweep to
  warm up (and capture, on a GPU), then `probe` timed sweeps; the certified prefix's growth
  over them predicts the sweeps left, its time per sweep their cost.

A candidate that finishes within its probe has measured its whole cost. The choice, the
prediction of every candidate and the actual time of the chosen solve go to
`Solution.stats["auto"]`. The probes are the price (a few sweeps per candidate); the result is
exact whatever the choice, like every method's.

Example:
    >>> sol = ffsolve.solve(problem, method="auto")
    >>> sol.stats["auto"]["choice"], sol.stats["auto"]["reason"]
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.runtime import synchronize
from ffsolve.solvers.base import Solver
from ffsolve.solvers.loop import State, Stopping, run
from ffsolve.solvers.record import Solution

__all__ = ["candidates", "solve_auto"]


def candidates(problem: Problem, make: Callable[..., Solver]) -> list[Solver]:
    """The methods worth probing on `problem` (`make(name, **options)` builds one)."""
    T = problem.length
    out = [make("jacobi")]
    if T > 4:
        out.append(make("gs_jacobi", window=max(2, math.isqrt(T - 1) + 1)))
    if problem.first_order:
        out += [make("picard"), make("quasi_newton"), make("anderson", base="picard")]
    try:
        problem.linear_recurrence()
    except (TypeError, NotImplementedError):
        pass
    else:
        out.append(make("scan"))
    return out


def _seconds(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def _sequential_step(problem: Problem, steps: int) -> float:
    """Seconds per step of the problem's stepper (the sequential loop's cost per position)."""
    init = problem.initial()
    state = State(init, problem.dim)
    problem.prepare()
    step = problem.stepper(state.x)
    k = min(problem.length, steps)

    def go() -> None:
        for t in range(k):
            state.v[:, t : t + 1] = state.flat(step(t))

    with torch.no_grad():
        go()  # warm-up (a cache's first call, allocations)
        state.x.copy_(init)
        step = problem.stepper(state.x)
        seconds, _ = _seconds(go, init.device)
    return seconds / k


def solve_auto(
    problem: Problem,
    stopping: Stopping,
    make: Callable[..., Solver],
    callback: Callable[[int, Tensor], None] | None = None,
    *,
    probe: int = 3,
    methods: list[Solver] | None = None,
) -> Solution:
    """Probe, predict, choose, solve (see the module docstring)."""
    T = problem.length
    device = problem.initial().device
    seq_step = _sequential_step(problem, max(4, probe))
    table: dict[str, dict[str, Any]] = {
        "sequential": {"predicted_s": seq_step * T, "per_step_s": seq_step}
    }
    done: dict[str, Solution] = {}
    for solver in methods if methods is not None else candidates(problem, make):
        label = _label(solver)
        k = min(probe, T)
        trial = stopping.replace(max_iters=k, record=True, raise_on_failure=False)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # a probe stops early on purpose
                run(solver, problem, trial.replace(max_iters=1))  # warm-up / capture
                seconds, sol = _seconds(lambda s=solver, tr=trial: run(s, problem, tr), device)
        except (TypeError, ValueError, NotImplementedError, RuntimeError, FloatingPointError) as e:
            table[label] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            continue
        per_sweep = seconds / max(1, sol.stats.get("sweeps_run", sol.num_iters))
        if sol.all_converged:  # finished within the probe: its whole cost is known
            table[label] = {
                "predicted_s": seconds,
                "per_sweep_s": per_sweep,
                "sweeps": sol.num_iters,
            }
            done[label] = sol
            continue
        sweeps, how = _sweeps_left(sol, T, stopping)
        sweeps = min(sol.num_iters + sweeps, solver.default_max_iters(T))
        table[label] = {"predicted_s": per_sweep * sweeps, "per_sweep_s": per_sweep,
                        "sweeps": sweeps, "by": how}  # fmt: skip
    ranked = sorted((v["predicted_s"], name) for name, v in table.items() if "predicted_s" in v)
    best_time, best = ranked[0]
    if best in done and callback is None:  # already solved in full by its probe
        sol = done[best]
        actual = table[best]["predicted_s"]
    else:
        solver = make("sequential") if best == "sequential" else _find(best, problem, make,
                                                                        methods)  # fmt: skip
        actual, sol = _seconds(lambda: run(solver, problem, stopping, callback), device)
    runner_up = ranked[1] if len(ranked) > 1 else None
    reason = f"{best} predicted {best_time:.3g} s" + (
        f", {runner_up[1]} next at {runner_up[0]:.3g} s" if runner_up else ""
    )
    stats = {**sol.stats, "auto": {"choice": best, "reason": reason, "predicted_s": best_time,
                                   "actual_s": actual, "candidates": table}}  # fmt: skip
    return dataclasses.replace(sol, stats=stats)


def _sweeps_left(sol: Solution, T: int, stopping: Stopping) -> tuple[int, str]:
    """Sweeps still needed after the probe, the smaller of two estimates: the certified
    prefix growing at its probed rate (at least one position per sweep, which Jacobi
    guarantees), and the change shrinking at its probed geometric rate down to the tolerance
    (a contraction certifies everything at once, late)."""
    n = sol.num_iters
    cert = sol.certified[-1].min().item() if sol.certified is not None else n
    rate = max(cert / n, 1.0)
    best = math.ceil((T - cert) / rate), "prefix"
    res = sol.residuals
    if res is not None and n >= 2:
        first, last = res[0].max().item(), res[-1].max().item()
        scale = sol.value.abs().max().item()
        eps = torch.finfo(sol.value.dtype).eps if sol.value.is_floating_point() else 0.0
        target = max(stopping.atol + stopping.rtol * scale, eps * max(scale, 1.0))
        if 0 < last < first and target > 0 and all(map(math.isfinite, (first, last))):
            ratio = (last / first) ** (1 / (n - 1))
            geo = (
                max(1, math.ceil(math.log(target / last) / math.log(ratio))) if last > target else 1
            )
            if geo < best[0]:
                best = geo, "contraction"
    return best


def _label(solver: Solver) -> str:
    opts = {k: v for k, v in solver.options().items() if v is not None}
    shown = {k: v for k, v in opts.items() if k in ("window", "block_size", "base", "history")}
    return solver.name + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def _find(label: str, problem: Problem, make, methods) -> Solver:
    for solver in methods if methods is not None else candidates(problem, make):
        if _label(solver) == label:
            return solver
    raise RuntimeError(f"internal: no candidate {label}")
