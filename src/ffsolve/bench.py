"""The experiment harness: timed rows side by side with the strongest baseline, and traces.

Every experiment times its rows here, and only here:

- `measure(fn, device)`: warm-up calls, then synchronised timed calls; median, spread, peak
  device memory. `clock(fn, device)` is one synchronised call (a training step, say).
- `timed_rows(rows, device)`: each `Row` measured in turn in one process; its value compared
  with the reference row's (max|diff|, bitwise equality) and its time with every sequential
  baseline and the strongest of them (the fastest measured here). A row that fails is
  recorded with its error, and the others still run.
- `trace_solve(solver, problem, reference, device)`: one untimed solve that records, per
  sweep, the distance to the reference and a clock (for figures; never timed).

Timed runs record no traces and stop online; traces come from separate untimed solves.
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
from ffsolve.runtime import synchronize
from ffsolve.solvers import Solver, Stopping, get_solver

__all__ = [
    "Outcome",
    "Row",
    "clock",
    "format_table",
    "measure",
    "solver_row",
    "timed_rows",
    "trace_solve",
]


def clock(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call of fn(), the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 7,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Median, spread and peak device memory of fn() (synchronised, after warm-up).

    Args:
        tick: called between calls (never inside a timed one), e.g. to advance a progress bar.

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
        if tick is not None:
            tick()
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, result = [], None
    for _ in range(max(1, repeats)):
        seconds, result = clock(fn, device)
        times.append(seconds)
        if tick is not None:
            tick()
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
class Outcome:
    """What one call of a row produced: the value compared with the reference row's, the
    iterations it took, and extra record fields (model evaluations, convergence, ...)."""

    value: Tensor
    num_iters: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One row of a comparison.

    Attributes:
        label: unique in its table (e.g. "jacobi", "sequential-incremental").
        kind: "sequential" for a sequential baseline, else the parallel method's name.
        call: one run of the row, returning an `Outcome`.
        options: the row's method options, recorded.
        solver, problem, stopping: what a solver row solves (`solver_row`), for traces.
    """

    label: str
    kind: str
    call: Callable[[], Outcome]
    options: dict[str, Any] = field(default_factory=dict)
    solver: Solver | None = None
    problem: Problem | None = None
    stopping: Stopping | None = None

    def trace(self, reference: Tensor, device: torch.device, **kw: Any) -> dict[str, Any]:
        """`trace_solve` of this solver row (same problem and stopping rule)."""
        if self.solver is None or self.problem is None:
            raise TypeError(f"row {self.label!r} is not a solver row: nothing to trace")
        return trace_solve(
            self.solver, self.problem, reference, device, stopping=self.stopping, **kw
        )


def solver_row(
    label: str,
    method: str | Solver,
    problem: Problem,
    stopping: Stopping | None = None,
    **options: Any,
) -> Row:
    """A row that solves `problem` by `method` (no traces: `record` is off in timed solves)."""
    solver = get_solver(method, **options)
    stop = Stopping.of(stopping, record=False)

    def call() -> Outcome:
        sol = solver.solve(problem, stop)
        extra = {
            "num_evals": sol.num_evals,
            "converged": sol.all_converged,
            "captured": bool(sol.stats.get("captured")),
        }
        if "auto" in sol.stats:  # method="auto": what it chose, predicted and why
            extra["auto"] = {k: sol.stats["auto"].get(k) for k in ("choice", "tuned", "reason")}
        return Outcome(sol.value, sol.num_iters, extra)

    opts = {k: v for k, v in solver.options().items() if v is not None}
    return Row(label, solver.name, call, opts, solver, problem, stop)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(
            f"a row's value has shape {tuple(a.shape)}, the reference's {tuple(b.shape)}"
        )
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def timed_rows(
    rows: Sequence[Row],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 3,
    reference: str | None = None,
    reference_value: Tensor | None = None,
    baselines: Sequence[str] | None = None,
    grad: bool = False,
    log: Callable[[str], None] = lambda s: None,
    keep: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Outcome]]:
    """Measure every row in one process and compare it with the reference and the baselines.

    Args:
        rows: the rows; labels must be unique.
        reference: the label whose value every row is compared with (default: the first
            sequential row, else the first row).
        reference_value: compare with this tensor instead (a reference computed untimed).
        baselines: labels of the sequential baselines (default: every sequential row);
            `speedup_vs_<label>` is recorded for each, and `speedup_vs_sequential` against the
            fastest of them as measured here (the strongest, named in `strongest_baseline`).
        grad: run the rows with autograd on (default: under no_grad).
        keep: called with each row's record as soon as it is measured (`RunContext.keep`:
            an interrupted run keeps its finished rows); the ratios are added at the end.

    Returns:
        (records, outcomes): one record per row, in order (a failed row: `method`, `solver`,
        `error`), and the last Outcome of each row that ran.
    """
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate row labels: {labels}")
    seq = [r.label for r in rows if r.kind == "sequential"]
    if reference is None and reference_value is None:
        reference = seq[0] if seq else labels[0]
    baselines = list(seq if baselines is None else baselines)
    for need in ([] if reference is None else [reference]) + baselines:
        if need not in labels:
            raise ValueError(f"no row {need!r} to compare with; rows: {labels}")
    width = max(len(label) for label in labels)
    records: list[dict[str, Any]] = []
    outcomes: dict[str, Outcome] = {}
    bar = iter(
        track(range(len(rows) * (warmup + max(1, repeats))), desc="rows", unit="call", lines=False)
    )

    def tick() -> None:
        next(bar, None)

    for row in rows:
        try:
            with torch.set_grad_enabled(grad):
                m = measure(row.call, device, warmup, repeats, tick)
        except Exception as e:  # one failing row is reported, the others still run
            msg = f"{type(e).__name__}: {e}"
            log(f"  {row.label:<{width}} FAILED: {msg}")
            records.append({"method": row.label, "solver": row.kind, "error": msg})
            if keep is not None:
                keep(records[-1])
            continue
        out: Outcome = m.pop("result")
        outcomes[row.label] = out
        rec = {
            "method": row.label,
            "solver": row.kind,
            "options": row.options,
            "num_iters": int(out.num_iters),
            **out.extra,
            "wall_time_s": m["median_s"],
            "wall_times_s": m["times_s"],
            **{k: m[k] for k in ("min_s", "max_s", "peak_mem_mb", "mem_before_mb")},
        }
        ref_now = reference_value if reference is None else outcomes.get(reference)
        ref_now = getattr(ref_now, "value", ref_now)
        if ref_now is not None:  # known already: the kept record carries the comparison
            _compare(rec, out.value, ref_now)
        records.append(rec)
        if keep is not None:
            keep(rec)
        log(
            f"  {row.label:<{width}} {m['median_s'] * 1e3:10.3f} ms  [{m['min_s'] * 1e3:.3f}, "
            f"{m['max_s'] * 1e3:.3f}]  iters={out.num_iters}"
            + (
                f"  captured={'y' if out.extra['captured'] else 'n'}"
                if "captured" in out.extra
                else ""
            )
            + (f"  chose {out.extra['auto']['choice']}" if "auto" in out.extra else "")
        )
    by = {r["method"]: r for r in records if "error" not in r}
    ref = reference_value if reference is None else getattr(outcomes.get(reference), "value", None)
    timed_baselines = [b for b in baselines if b in by]
    strongest = min(timed_baselines, key=lambda b: by[b]["wall_time_s"], default=None)
    for rec in by.values():
        if ref is not None and "max_abs_diff_vs_sequential" not in rec:  # rows before the ref
            _compare(rec, outcomes[rec["method"]].value, ref)
        if strongest is not None:
            rec["speedup_vs_sequential"] = by[strongest]["wall_time_s"] / rec["wall_time_s"]
            rec["strongest_baseline"] = strongest
        for b in timed_baselines:
            rec[f"speedup_vs_{b}"] = by[b]["wall_time_s"] / rec["wall_time_s"]
    return records, outcomes


def _compare(rec: dict[str, Any], value: Tensor, ref: Tensor) -> None:
    diff = _max_abs_diff(value, ref)
    rec["max_abs_diff_vs_sequential"] = diff
    rec["equal_to_sequential"] = diff == 0.0


def format_table(records: Sequence[dict[str, Any]], extra: Sequence[tuple[str, str]] = ()) -> str:
    """A plain-text table of method, iterations, evaluations, time, speed-up, difference,
    plus `extra` columns given as (record key, header); failed rows show their error."""
    head = ["method", "iters", "evals", "seconds", "speed-up", "max|diff|", *(h for _, h in extra)]
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append([r["method"], "FAILED: " + r["error"][:60], *[""] * (len(head) - 2)])
            continue
        rows.append(
            [
                r["method"],
                str(r["num_iters"]),
                _fmt(r.get("num_evals")),
                f"{r['wall_time_s']:.4f}",
                _fmt_x(r.get("speedup_vs_sequential")),
                _fmt(r.get("max_abs_diff_vs_sequential")),
                *(_fmt(r.get(key)) for key, _ in extra),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _fmt_x(v: Any) -> str:
    return "" if v is None else f"{v:.2f}x"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.2e}" if abs(v) < 1e-2 else f"{v:.3g}"
    return str(v)


def trace_solve(
    solver: Solver,
    problem: Problem,
    reference: Tensor,
    device: torch.device,
    frames: Sequence[int] = (),
    stopping: Stopping | None = None,
    final: Tensor | None = None,
) -> dict[str, Any]:
    """One untimed solve that records, per iteration, the distance of the iterate to a
    reference solution (e.g. the sequential sample), the forward difference and a clock.

    The clock synchronises after every iteration, so it runs a little slower than a timed
    solve; figures say so. Distances are over the canonical (B, T, F) state: `l2` is the mean
    over the batch of each item's l2 norm, `positions_differing` counts (item, position)
    pairs with any feature not bitwise equal to the reference.

    Args:
        frames: iterations whose iterates are kept (0 is the initial iterate).
        final: the method's own final value: adds `l2_to_final` and `iters_to_exact_final`.

    Returns:
        A dict of per-iteration lists (`l2_to_reference`, `max_abs_to_reference`,
        `positions_differing`, `forward_difference`, `clock_s`, `residuals`, `certified`),
        `iters_to_equal_reference` (None when never bitwise equal), `num_iters`, and
        `snapshots` {k: iterate} at `frames`.
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
    if final is not None:
        out["l2_to_final"] = []
    equal: list[bool] = []
    equal_final: list[bool] = []
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
        if final is not None:
            out["l2_to_final"].append(float((x - final).reshape(B, -1).double().norm(dim=1).mean()))
            equal_final.append(bool(torch.equal(x, final)))
        prev.copy_(x)
        if k in frames:
            snaps[k] = x.detach().clone()

    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = solver.solve(
            problem, Stopping.of(stopping, record=True, capture=False), callback=callback
        )
    first = lambda flags: next((i + 1 for i, f in enumerate(flags) if f), None)  # noqa: E731
    out["iters_to_equal_reference"] = first(equal)
    if final is not None:
        out["iters_to_exact_final"] = first(equal_final)
    out["residuals"] = (
        sol.residuals.double().amax(1).tolist() if sol.residuals is not None else None
    )
    out["certified"] = sol.certified.amin(1).tolist() if sol.certified is not None else None
    out["num_iters"] = sol.num_iters
    out["snapshots"] = snaps
    return out
