"""Solvers for triangular systems: one loop, one record, one table of methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ffsolve.problems.base import FunctionProblem, Problem
from ffsolve.solvers.base import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    Solution,
    Solver,
)
from ffsolve.solvers.gs_jacobi import GSJacobi
from ffsolve.solvers.jacobi import Jacobi
from ffsolve.solvers.jacobi_gs import JacobiGS
from ffsolve.solvers.newton import DivergenceWarning, Newton, QuasiNewton
from ffsolve.solvers.scan import Scan, linear_scan
from ffsolve.solvers.sequential import Sequential

__all__ = [
    "METHODS",
    "ConvergenceError",
    "ConvergenceWarning",
    "DivergenceWarning",
    "NonFiniteError",
    "Solution",
    "Solver",
    "get_solver",
    "linear_scan",
    "solve",
]

#: The method table: name -> solver class. A new solver is one file plus one entry here.
METHODS: dict[str, type[Solver]] = {
    cls.name: cls for cls in (Sequential, Jacobi, JacobiGS, GSJacobi, Scan, Newton, QuasiNewton)
}


def get_solver(method: str | Solver, **options: Any) -> Solver:
    """Resolve a method name (plus its options) or pass a solver object through."""
    if isinstance(method, Solver):
        if options:
            raise TypeError(
                f"options {sorted(options)} given with a solver object; set them on the object"
            )
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[method]
    valid = {f for f in cls.__dataclass_fields__}
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
    atol: float = 0.0,
    rtol: float = 0.0,
    max_iters: int | None = None,
    *,
    record: bool = True,
    check_every: int | tuple[int, int] | None = None,
    raise_on_failure: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    capture: bool | str = "auto",
    **options: Any,
) -> Solution:
    """Solve the triangular system x_t = f_t(x_<t) by `method`; every method gives the
    sequential answer.

    Iteration (Jacobi): x^{k+1} = fn(x^k), stopped once every position is certified, i.e.
    unchanged within atol + rtol*|x| (bitwise with the default zero tolerances).

    Args:
        fn: maps a tensor shaped like x0 to one of the same shape; index t along `dim` of
            fn(x) depends only on indices < t of x. Or a `ffsolve.problems.Problem`.
        x0: (..., T, ...) the starting iterate; leading dims are batch, trailing dims are
            features of a position. Omit when fn is a Problem.
        method: a name from `METHODS` ("sequential", "jacobi", "jacobi_gs", "gs_jacobi") or
            a solver object.
        dim: the position dimension of x0.
        atol, rtol: tolerances of the convergence test; 0 and 0 mean exact equality.
        max_iters: iteration budget; defaults to the bound that guarantees exactness
            (T for jacobi, the number of blocks for jacobi_gs).
        record: keep residual and certified-prefix traces (turn off for timing).
        check_every: read the convergence flag on the host every this many sweeps (the
            iteration count, value and traces stay those of stopping at convergence: the
            device step freezes once done), or a pair (first, then): a first chunk of
            `first` sweeps, then chunks of `then`. Default: 1 eager, (16, 4) when captured.
        raise_on_failure: raise ConvergenceError instead of warning when max_iters is hit.
        callback: called as callback(k, x) after iteration k with the current iterate (a live
            buffer: clone what you keep); off in timed runs.
        capture: "auto" captures a chunk of `check_every` sweeps (or, for `sequential`, the
            whole loop) in a CUDA graph and replays it, when the state is on CUDA, the
            method's window is static and the problem says its sweep (stepper) is capturable;
            True forces it (the caller vouches for the function), False never captures. A
            captured loop is cached on the problem and replayed by its later solves.
        **options: method options (`block_size`, `window`).

    Returns:
        A `Solution`.

    Example:
        >>> sol = ffsolve.solve(lambda x: torch.cumsum(x, 1).roll(1, 1) * 0 + 1, x0)
        >>> sol.value, sol.num_iters
    """
    solver = get_solver(method, **options)
    if isinstance(fn, Problem):
        if x0 is not None:
            raise TypeError("x0 must be omitted when a Problem is passed (it owns its start)")
        problem = fn
    else:
        if x0 is None:
            raise TypeError("x0 is required when fn is a function")
        problem = FunctionProblem(fn, x0, dim)
    return solver.solve(
        problem,
        atol=atol,
        rtol=rtol,
        max_iters=max_iters,
        record=record,
        check_every=check_every,
        raise_on_failure=raise_on_failure,
        callback=callback,
        capture=capture,
    )
