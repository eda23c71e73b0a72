"""method="auto": find out which method is cheapest on this problem, solve with it, say why.

A parallel method pays when the sweeps it needs cost less than the sequential loop's T steps;
both depend on the model, the batch, the device and how fast the certified prefix grows, which
no rule of thumb knows in advance (measured on an H200: from 113x to 0.03x). So `auto`
measures, on the problem in hand:

1. **the sequential loop**: a few steps of the problem's stepper, times T (a prediction);
2. **a probe of each candidate** (`candidates`: jacobi, a sliding window of about sqrt(T),
   and, where the problem allows, picard, quasi_newton, anderson and scan): one warm-up sweep
   (a capture on a GPU), then `probe` timed sweeps. Time per sweep, and a prediction of the
   sweeps left: the smaller of the certified prefix growing at its probed rate and the change
   shrinking geometrically to the tolerance. Predictions from a few sweeps are rough (Jacobi
   on MADE certifies little for 20 sweeps, then everything), so they only order the race;
3. **a race**: the `race` best predicted candidates run in turn, each stopped once it has spent
   the best time so far (first the sequential loop's predicted time). A candidate that
   finishes is an exact answer and sets the bar for the next; if none finishes, the
   sequential loop runs.

A tuning solve therefore costs at most about (race + 1) times the sequential loop, plus the
probes, when every parallel method loses, and the winner's own time plus the probes when one
wins. The choice is remembered for the process (keyed by the problem's class and
`tune_key()`, shape, dtype, device, tolerances and candidates), so a repeated solve of the
same kind runs the winner alone; `forget()` or `Auto(retune=True)` tunes again. The choice,
the reason, every candidate's probe, prediction and race, and the actual time go to
`Solution.stats["auto"]`. The result is exact whatever the choice, like every method's.

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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.runtime import synchronize
from ffsolve.solvers.base import Solver, Window, check_int
from ffsolve.solvers.loop import State, Stopping, captures, run
from ffsolve.solvers.record import Solution

__all__ = ["Auto", "candidates", "solve_auto"]


@dataclass(frozen=True)
class Auto(Solver):
    """Find the cheapest method on this problem (probe, predict, race) and solve with it; the
    choice and why in `stats["auto"]`, remembered for the next solve of the same kind.

    Args:
        probe: timed sweeps per candidate (after one warm-up sweep).
        race: how many of the best predicted candidates race the sequential loop.
        methods: the candidates (names or solver objects); default: every method that
            applies to the problem (`candidates`).
        retune: tune again even if a solve of the same kind was tuned in this process.

    Example:
        >>> sol = ffsolve.solve(problem, method="auto")
        >>> sol.stats["auto"]["choice"], sol.stats["auto"]["reason"]
    """

    name: ClassVar[str] = "auto"
    probe: int = 3
    race: int = 2
    methods: tuple[Any, ...] | None = None
    retune: bool = False

    def __post_init__(self) -> None:
        check_int("probe", self.probe)
        check_int("race", self.race, low=0)
        if self.methods is not None:
            if isinstance(self.methods, str) or not len(self.methods):
                raise ValueError(f"auto: methods must be a non-empty list, got {self.methods!r}")
            object.__setattr__(self, "methods", tuple(self.methods))

    def options(self) -> dict[str, Any]:
        shown = None if self.methods is None else [
            m if isinstance(m, str) else _label(m) for m in self.methods
        ]  # fmt: skip
        return {"probe": self.probe, "race": self.race, "methods": shown, "retune": self.retune}

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        raise TypeError("auto has no sweep of its own: it chooses a method (call its solve)")

    def solve(
        self, problem: Problem, stopping: Stopping | None = None, *, callback=None, **fields
    ) -> Solution:
        from ffsolve.solvers import get_solver  # the method table, which lists this class

        methods = None if self.methods is None else [get_solver(m) for m in self.methods]
        if methods is not None and any(isinstance(m, Auto) for m in methods):
            raise ValueError("auto: a candidate cannot itself be 'auto'")
        stop = Stopping.merged(stopping, **fields)
        return solve_auto(problem, stop, get_solver, callback, probe=self.probe,
                          race=self.race, methods=methods, retune=self.retune)  # fmt: skip


#: the window of the windowed picard and anderson candidates, on problems that gather a
#: window on the device (`Problem.window_on_device`: samplers) and are longer than twice it
SAMPLER_WINDOW = 32

#: the largest feature count F for which quasi_newton is a default candidate when the problem
#: has no `jacobians` of its own
MAX_GENERIC_JACOBIAN_FEATURES = 64


def candidates(problem: Problem, make: Callable[..., Solver]) -> list[Solver]:
    """The methods worth probing on `problem` (`make(name, **options)` builds one)."""
    T = problem.length
    out = [make("jacobi")]
    if T > 4:
        out.append(make("gs_jacobi", window=max(2, math.isqrt(T - 1) + 1)))
    if problem.first_order:
        out += [make("picard"), make("anderson", base="picard")]
        if problem.window_on_device and T > 2 * SAMPLER_WINDOW:
            # a sampler's window is a batched call of its own (captured, no host read): over
            # a long schedule the whole-length call costs far more than a window's
            W = SAMPLER_WINDOW
            out += [make("picard", window=W), make("anderson", base="picard", window=W)]
        # the generic diagonal Jacobian takes F vector-Jacobian products at once (memory F
        # times a sweep's): only where F is small or the problem computes its own
        F = State(problem.initial(), problem.dim).F
        if F <= MAX_GENERIC_JACOBIAN_FEATURES or type(problem).jacobians is not Problem.jacobians:
            out.append(make("quasi_newton"))
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


def _sequential(
    seq: Solver, problem: Problem, stopping: Stopping, steps: int, device: torch.device
) -> tuple[dict[str, Any], Solution | None]:
    """The sequential loop's cost: measured in full where it runs as one CUDA graph (a few
    eager steps would overstate it many times; the solve is then also the answer if nothing
    beats it), else predicted from a few steps of the stepper."""
    if captures(stopping, device, declared=seq.captures_with(problem)):
        run(seq, problem, stopping)  # the capture
        seconds, sol = _seconds(lambda: run(seq, problem, stopping), device)
        return {"predicted_s": seconds, "measured": True}, sol
    first, per_step = _sequential_step(problem, steps)
    predicted = first + per_step * (problem.length - 1)
    return {"predicted_s": predicted, "first_step_s": first, "per_step_s": per_step}, None


def _sequential_step(problem: Problem, steps: int) -> tuple[float, float]:
    """Seconds of the stepper's first step (a cache's prefill: a prompt, a context) and per
    step after it, timed over the first `steps` steps after a warm-up pass."""
    init = problem.initial()
    state = State(init, problem.dim)
    problem.prepare()
    k = min(problem.length, steps + 1)

    def go(step, start: int, stop: int) -> None:
        for t in range(start, stop):
            state.v[:, t : t + 1] = state.flat(step(t))

    go(problem.stepper(state.x), 0, k)  # warm-up (allocations, a first call's setup)
    state.x.copy_(init)
    step = problem.stepper(state.x)
    first, _ = _seconds(lambda: go(step, 0, 1), init.device)
    rest, _ = _seconds(lambda: go(step, 1, k), init.device)
    return first, (rest / (k - 1) if k > 1 else first)


def solve_auto(
    problem: Problem,
    stopping: Stopping,
    make: Callable[..., Solver],
    callback: Callable[[int, Tensor], None] | None = None,
    *,
    probe: int = 3,
    race: int = 2,
    methods: list[Solver] | None = None,
    retune: bool = False,
) -> Solution:
    """Probe, predict, race, solve, remember (see the module docstring)."""
    cands = methods if methods is not None else candidates(problem, make)
    by_label = {_label(s): s for s in cands}
    device = problem.initial().device
    key = _key(problem, stopping, by_label)
    if not retune and key in _TUNED:
        label, why = _TUNED[key]
        solver = by_label.get(label) or make("sequential")
        actual, sol = _seconds(lambda: run(solver, problem, stopping, callback), device)
        auto = {"choice": label, "reason": f"tuned earlier in this process: {why}",
                "tuned": False, "actual_s": actual}  # fmt: skip
        return dataclasses.replace(sol, stats={**sol.stats, "auto": auto})

    t0 = time.perf_counter()
    T = problem.length
    seq = make("sequential")
    table: dict[str, dict[str, Any]] = {}
    table["sequential"], seq_sol = _sequential(seq, problem, stopping, max(4, probe), device)
    for label, solver in by_label.items():
        table[label] = _probe(solver, problem, stopping, min(probe, T), device)
    ranked = sorted(
        (row["predicted_s"], label)
        for label, row in table.items()
        if label != "sequential" and "predicted_s" in row
    )
    # the race: the best predicted candidates, each stopped once it has spent what the best
    # so far (first: the sequential loop's prediction) costs; a finisher is the answer
    bar, best, won = table["sequential"]["predicted_s"], "sequential", None
    for _, label in ranked[:race]:
        row = table[label]
        sol, seconds = _race(by_label[label], problem, stopping, row, bar, device)
        if sol is not None and sol.all_converged and seconds < bar:
            bar, best, won = seconds, label, sol
    why = (
        f"{best} finished in {bar:.3g} s, within the sequential loop's predicted "
        f"{table['sequential']['predicted_s']:.3g} s"
        if won is not None
        else f"no parallel method finished within the sequential loop's predicted {bar:.3g} s"
    )
    tuning = time.perf_counter() - t0
    if won is not None and callback is None:
        sol, actual = won, bar
    elif won is None and seq_sol is not None and callback is None:
        sol, actual = seq_sol, table["sequential"]["predicted_s"]
    else:  # the sequential loop, or the winner again for the callback
        solver = by_label.get(best) or seq
        actual, sol = _seconds(lambda: run(solver, problem, stopping, callback), device)
    _TUNED[key] = (best, why)
    auto = {"choice": best, "reason": why, "tuned": True, "tuning_s": tuning,
            "predicted_s": table[best].get("predicted_s"), "actual_s": actual,
            "candidates": table}  # fmt: skip
    return dataclasses.replace(sol, stats={**sol.stats, "auto": auto})


def _race(
    solver: Solver,
    problem: Problem,
    stopping: Stopping,
    row: dict[str, Any],
    bar: float,
    device: torch.device,
) -> tuple[Solution | None, float]:
    """Run `solver` with the sweeps `bar` seconds buy (and a little slack: a candidate
    stopped just short would lose everything). A candidate stopped because its probe had
    overstated its sweep's cost (by a fifth or more: a busy host) races once more with the
    cost its race measured. Notes what happened in `row`."""
    per_sweep = row["per_sweep_s"]
    cap = stopping.max_iters or solver.default_max_iters(problem.length)
    sol, seconds = None, math.inf
    for attempt in range(2):
        budget = math.floor(1.25 * (bar - row["setup_s"]) / per_sweep)
        if budget < 1:
            row["race"] = "no budget: one sweep costs more than the best so far"
            break
        trial = stopping.replace(max_iters=min(budget, cap), raise_on_failure=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a race stops early on purpose
            seconds, sol = _seconds(lambda tr=trial: run(solver, problem, tr), device)
        row["race_s"], row["race_sweeps"] = seconds, sol.num_iters
        row["race"] = "finished" if sol.all_converged else f"stopped at {sol.num_iters} sweeps"
        measured = max(seconds - row["setup_s"], 0.0) / max(1, sol.num_iters)
        if sol.all_converged or budget >= cap or measured > 0.8 * per_sweep or attempt:
            break
        per_sweep = measured
        row["race_again"] = (
            f"probe said {row['per_sweep_s']:.3g} s a sweep, the race {measured:.3g}"
        )
    return sol, seconds


#: choices made in this process: (problem class and tune_key, shape, dtype, device, stopping,
#: candidates) -> (label, reason); `forget()` clears it
_TUNED: dict[tuple, tuple[str, str]] = {}


def forget() -> None:
    """Forget the choices `auto` made in this process (the next solve of each kind tunes)."""
    _TUNED.clear()


def _key(problem: Problem, stopping: Stopping, by_label: dict[str, Solver]) -> tuple:
    init = problem.initial()
    return (type(problem).__qualname__, problem.tune_key(), tuple(init.shape), init.dtype,
            str(init.device), stopping.replace(record=False, raise_on_failure=False),
            tuple(by_label))  # fmt: skip


def _probe(
    solver: Solver, problem: Problem, stopping: Stopping, k: int, device: torch.device
) -> dict[str, Any]:
    """One warm-up sweep (a capture on a GPU), then k timed sweeps: time per sweep and the
    predicted whole cost."""
    trial = stopping.replace(max_iters=k, record=True, raise_on_failure=False)
    one = trial.replace(max_iters=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe stops early on purpose
            run(solver, problem, one)  # warm-up (and a capture)
            # each timing the faster of two (a busy host's noise only ever adds)
            first = min(_seconds(lambda: run(solver, problem, one), device)[0] for _ in "ab")
            (seconds, sol), (again, _) = (
                _seconds(lambda: run(solver, problem, trial), device) for _ in "ab"
            )
            seconds = min(seconds, again)
    except (TypeError, ValueError, NotImplementedError, RuntimeError, FloatingPointError) as e:
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    n = max(1, sol.stats.get("sweeps_run", sol.num_iters))
    # a solve costs a fixed setup plus its sweeps: the two timings separate them
    per_sweep = (seconds - first) / (n - 1) if n > 1 else seconds
    per_sweep = max(per_sweep, 0.25 * seconds / n)  # (timing noise)
    setup = max(0.0, first - per_sweep)
    row = {"per_sweep_s": per_sweep, "setup_s": setup}
    if sol.all_converged:
        return {**row, "predicted_s": seconds, "sweeps": sol.num_iters}
    left, how = _sweeps_left(sol, problem.length, stopping)
    sweeps = min(sol.num_iters + left, solver.default_max_iters(problem.length))
    return {**row, "predicted_s": setup + per_sweep * sweeps, "sweeps": sweeps, "by": how}


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
    """The method's name and the options it sets away from their defaults."""
    default = type(solver)()
    shown = {k: v for k, v in solver.options().items() if v != default.options().get(k)}
    return solver.name + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
