"""The timing harness: every method side by side with the sequential baselines, one process.

Timed runs record no traces and stop online; a separate untimed run of each method records
the traces for the figures. Timings synchronise the device around the timed region and
report the median of the repeats after warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.progress import track
from ffsolve.solvers import Solution, Solver, get_solver

__all__ = ["MethodSpec", "time_call", "measure", "compare", "format_table", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3
) -> tuple[float, list[float], Any]:
    """Median wall time of fn() over `repeats` after `warmup` calls (device synchronised).

    Returns:
        (median seconds, all timings, the last result).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, result = _timed(fn, device, repeats)
    return statistics.median(times), times, result


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    """Wall times of max(1, repeats) synchronised calls of fn(), and the last result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, result


def measure(
    fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 7
) -> dict[str, Any]:
    """Median, spread and peak device memory of fn() (synchronised, after warm-up).

    Returns:
        {"median_s", "min_s", "max_s", "times_s", "peak_mem_mb", "mem_before_mb", "result"}:
        the most device memory allocated at any moment of the timed calls, and what was
        allocated when they began (both 0 on the CPU). The peak is absolute, not a difference:
        a call may free memory held before it (a cached graph replaced, say), and a
        difference then read negative.
    """
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, result = _timed(fn, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_mem_mb": peak,
        "mem_before_mb": before / 2**20,
        "result": result,
    }


@dataclass
class MethodSpec:
    """One row of a comparison: a label, a solver, and the problem it runs on.

    `problem` may differ per row (e.g. the naive and the incremental sequential samplers are
    two adapters of the same model and noise); by default the comparison's problem is used.
    """

    label: str
    solver: Solver
    problem: Problem | None = None
    solve_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, label: str, method: str, problem: Problem | None = None, **options: Any):
        return cls(label, get_solver(method, **options), problem)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(
    problem: Problem,
    specs: Sequence[MethodSpec],
    device: torch.device,
    *,
    reference: str = "sequential",
    baselines: Sequence[str] = ("sequential",),
    warmup: int = 1,
    repeats: int = 3,
    atol: float = 0.0,
    rtol: float = 0.0,
    record: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], dict[str, Solution]]:
    """Time and check every method against the reference, in one process on one device.

    Args:
        problem: the default problem of every row.
        specs: the rows; labels must be unique and include `reference` and `baselines`.
        reference: the label whose value every other method is compared with.
        baselines: labels of sequential baselines; `speedup_vs_<label>` is recorded for each,
            and `speedup_vs_sequential` against the fastest of them as measured here (the
            strongest baseline, named in `strongest_baseline`).
        record: run each parallel method once more with `record=True` for the residual and
            certified-prefix traces; False reuses the last timed solve (no traces), for
            callers that trace in their own way (e.g. `trace_solve`) or whose solves are slow.

    Returns:
        (records, solutions): one record per row (the timed fields and the traces), and the
        traced Solution per label.
    """
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate method labels: {labels}")
    for need in (reference, *baselines):
        if need not in labels:
            raise ValueError(f"compare needs a {need!r} row; rows: {labels}")

    timed: dict[str, tuple[float, list[float], Solution]] = {}
    traced: dict[str, Solution] = {}
    # the bar advances between rows, never inside a timed call
    for spec in track(specs, desc="methods", unit="method"):
        prob = spec.problem or problem
        kw = dict(atol=atol, rtol=rtol, **spec.solve_kwargs)

        def run(spec=spec, prob=prob, kw=kw) -> Solution:
            with torch.no_grad():
                return spec.solver.solve(prob, record=False, **kw)

        median, times, last = time_call(run, device, warmup=warmup, repeats=repeats)
        if spec.solver.name == "sequential" or not record:  # reuse the timed result
            traced[spec.label] = last
        else:
            with torch.no_grad():
                traced[spec.label] = spec.solver.solve(prob, record=True, **kw)
        timed[spec.label] = (median, times, traced[spec.label])
        log(f"  {spec.label:<24} {median:9.4f} s  iters={traced[spec.label].num_iters}")

    ref = traced[reference].value
    strongest = min(baselines, key=lambda b: timed[b][0])
    records = []
    for spec in specs:
        median, times, sol = timed[spec.label]
        rec: dict[str, Any] = {
            "method": spec.label,
            "solver": spec.solver.name,
            "options": {k: v for k, v in spec.solver.options().items() if v is not None},
            "num_iters": sol.num_iters,
            "num_evals": sol.num_evals,
            "converged": bool(sol.converged.all()),
            "wall_time_s": median,
            "wall_times_s": times,
            "speedup_vs_sequential": timed[strongest][0] / median,
            "strongest_baseline": strongest,
            "max_abs_diff_vs_sequential": _max_abs_diff(sol.value, ref),
        }
        for b in baselines:
            rec[f"speedup_vs_{b}"] = timed[b][0] / median
        rec["traces"] = {
            "residuals": sol.residuals.double().max(1).values.tolist()
            if sol.residuals is not None
            else None,
            "certified": sol.certified.min(1).values.tolist()
            if sol.certified is not None
            else None,
        }
        records.append(rec)
    return records, traced


def format_table(records: Sequence[dict[str, Any]], extra: Sequence[tuple[str, str]] = ()) -> str:
    """A plain-text table of method, iterations, evaluations, time, speed-up, difference,
    plus `extra` columns given as (record key, header)."""
    head = ["method", "iters", "evals", "seconds", "speed-up", "max|diff|", *(h for _, h in extra)]
    rows = [head]
    for r in records:
        rows.append(
            [
                r["method"],
                str(r["num_iters"]),
                str(r["num_evals"]),
                f"{r['wall_time_s']:.4f}",
                f"{r['speedup_vs_sequential']:.2f}x",
                f"{r['max_abs_diff_vs_sequential']:.2e}",
                *(_fmt(r.get(key)) for key, _ in extra),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v < 1e-2 else f"{v:.3g}"
    return "" if v is None else str(v)


def trace_solve(
    solver: Solver,
    problem: Problem,
    reference: Tensor,
    device: torch.device,
    frames: Sequence[int] = (),
    **solve_kwargs: Any,
) -> dict[str, Any]:
    """One untimed solve that records, per iteration, the distance of the iterate to a
    reference solution (e.g. the sequential sample), the forward difference and a clock.

    The clock synchronises after every iteration, so it runs a little slower than a timed
    solve; figures say so. Distances are over the canonical (B, T, F) state: `l2` is the mean
    over the batch of each item's l2 norm, `positions_differing` counts (item, position)
    pairs with any feature not bitwise equal to the reference.

    Returns:
        A dict of per-iteration lists (`l2_to_reference`, `max_abs_to_reference`,
        `positions_differing`, `forward_difference`, `clock_s`), `iters_to_equal_reference`
        (None when never bitwise equal), `num_iters`, and `snapshots` {k: iterate} at
        `frames` (k = 0 is the initial iterate).
    """
    ref = reference.detach()
    B = ref.shape[0]
    prev = problem.initial().detach().clone()
    out: dict[str, Any] = {
        "l2_to_reference": [],
        "max_abs_to_reference": [],
        "positions_differing": [],
        "forward_difference": [],
        "clock_s": [],
    }
    equal: list[bool] = []
    snaps: dict[int, Tensor] = {0: prev.clone()} if 0 in frames else {}
    t0 = 0.0

    def callback(k: int, x: Tensor) -> None:
        synchronize(device)
        out["clock_s"].append(time.perf_counter() - t0)
        d = (x - ref).reshape(B, ref.shape[1], -1).double()  # (B, T, F)
        out["l2_to_reference"].append(float(d.flatten(1).norm(dim=1).mean()))
        out["max_abs_to_reference"].append(float(d.abs().max()))
        out["positions_differing"].append(int((d != 0).any(2).sum()))
        step = (x - prev).reshape(B, -1).double()
        out["forward_difference"].append(float(step.norm(dim=1).mean()))
        equal.append(bool(torch.equal(x, ref)))
        prev.copy_(x)
        if k in frames:
            snaps[k] = x.detach().clone()

    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = solver.solve(problem, record=False, callback=callback, **solve_kwargs)
    out["iters_to_equal_reference"] = next((i + 1 for i, e in enumerate(equal) if e), None)
    out["num_iters"] = sol.num_iters
    out["snapshots"] = snaps
    return out
