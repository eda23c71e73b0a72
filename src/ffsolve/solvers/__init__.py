"""Solvers for triangular systems: one loop, one record, one table of methods.

`solve` is the public entry point; `METHODS` maps each method's name to its class (a new
method is one file plus one entry here); `Stopping` holds the loop's options.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ffsolve.problems.base import FunctionProblem, Problem
from ffsolve.solvers.anderson import Anderson
from ffsolve.solvers.auto import Auto
from ffsolve.solvers.base import Solver, State
from ffsolve.solvers.gs_jacobi import GSJacobi
from ffsolve.solvers.jacobi import Jacobi
from ffsolve.solvers.jacobi_gs import JacobiGS
from ffsolve.solvers.loop import Stopping
from ffsolve.solvers.newton import Newton, QuasiNewton
from ffsolve.solvers.picard import Picard
from ffsolve.solvers.record import (
    ConvergenceError,
    ConvergenceWarning,
    DivergenceWarning,
    NonFiniteError,
    Solution,
)
from ffsolve.solvers.scan import Scan, linear_scan
from ffsolve.solvers.sequential import Sequential
from ffsolve.solvers.verify import Verification, VerificationWarning
from ffsolve.solvers.verify import verify as check

__all__ = [
    "METHODS",
    "ConvergenceError",
    "ConvergenceWarning",
    "DivergenceWarning",
    "NonFiniteError",
    "Solution",
    "Solver",
    "State",
    "Stopping",
    "Verification",
    "VerificationWarning",
    "get_solver",
    "linear_scan",
    "solve",
    "verify",
]

verify = check

#: The method table: name -> solver class. A new solver is one file plus one entry here.
METHODS: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (
        Sequential,
        Jacobi,
        JacobiGS,
        GSJacobi,
        Scan,
        Newton,
        QuasiNewton,
        Picard,
        Anderson,
        Auto,
    )
}


def get_solver(method: str | Solver, **options: Any) -> Solver:
    """Resolve a method name (plus its options) or pass a solver object through.

    Raises:
        ValueError: an unknown name (the valid ones are listed).
        TypeError: an option the method does not take (its options are listed).
    """
    if isinstance(method, Solver):
        if options:
            raise TypeError(
                f"options {sorted(options)} given with a solver object; set them on the object"
            )
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[method]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        takes = ", ".join(sorted(valid)) or "no options"
        raise TypeError(f"method {method!r} does not take {', '.join(unknown)} (it takes: {takes})")
    return cls(**{k: v for k, v in options.items() if v is not None})


def solve(
    fn: Callable[[Tensor], Tensor] | Problem,
    x0: Tensor | None = None,
    method: str | Solver = "jacobi",
    dim: int = 1,
    stopping: Stopping | None = None,
    *,
    callback: Callable[[int, Tensor], None] | None = None,
    verify: bool = False,
    **options: Any,
) -> Solution:
    """Solve the triangular system x_t = f_t(x_<t) by `method`; every method gives the
    sequential answer.

    Exact with zero tolerances means the certified fixed point of the parallel evaluation:
    the sequential answer bit for bit where the sweep and the sequential step run the same
    kernels on the same shapes, to rounding where they do not (the BLAS may sum a batched
    sweep and a one-step call in another order; docs/design.md).

    Iteration (Jacobi): x^{k+1} = fn(x^k), stopped once every position is certified, i.e.
    unchanged within atol + rtol*|x| (bitwise with the default zero tolerances).

    Args:
        fn: maps a tensor shaped like x0 to one of the same shape; index t along `dim` of
            fn(x) depends only on indices < t of x. Or a `ffsolve.problems.Problem`.
        x0: (..., T, ...) the starting iterate; leading dims are batch, trailing dims are
            features of a position. Omit when fn is a Problem.
        method: a name from `METHODS`, a solver object, or "auto": probe the methods that
            apply (a few timed sweeps each, and a few sequential steps), predict each one's
            whole cost, solve with the cheapest; the choice and every prediction go to
            `stats["auto"]` (`ffsolve.solvers.auto`). Its options: `probe` (timed sweeps per
            candidate, default 3) and `methods` (the candidates, names or solver objects).
        dim: the position dimension of x0.
        stopping: a `Stopping` (tolerances, budget, host reads, capture, traces).
        callback: called as callback(k, x) after iteration k with the current iterate (a live
            buffer: clone what you keep); off in timed runs.
        verify: afterwards, check the solution against the sequential loop at a few sampled
            positions and the causality of fn (`ffsolve.verify`): the report goes to
            `stats["verify"]`, and a `VerificationWarning` says what is wrong, if anything.
        **options: the method's options (`block_size`, `window`, `chunk`, ...) and `Stopping`
            fields, which replace those of `stopping` (atol=1e-6, max_iters=10, ...).

    Returns:
        A `Solution`: value, converged (per item), num_iters, num_evals, traces, stats.

    Example:
        >>> sol = ffsolve.solve(lambda x: torch.cumsum(x, 1) - x + 1, torch.zeros(2, 8))
        >>> sol.value, sol.num_iters
    """
    fields, options = Stopping.split(options)
    stop = Stopping.merged(stopping, **fields)
    solver = get_solver(method, **options)
    if isinstance(fn, Problem):
        if x0 is not None:
            raise TypeError("x0 must be omitted when a Problem is passed (it owns its start)")
        problem = fn
    else:
        if x0 is None:
            raise TypeError("x0 is required when fn is a function")
        problem = FunctionProblem(fn, x0, dim)
    sol = solver.solve(problem, stop, callback=callback)
    if verify:
        report = check(problem, sol.value, atol=stop.atol, rtol=stop.rtol)
        sol.stats["verify"] = dataclasses.asdict(report)
        if not report.ok:
            warnings.warn(
                f"{solver.name}: verify found: {'; '.join(report.findings)}",
                VerificationWarning,
                stacklevel=2,
            )
    return sol
