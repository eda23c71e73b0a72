"""The ordinary sequential loop (Gauss-Seidel in natural order): the reference and baseline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import NonFiniteError, Solution, Solver, _Canonical, check_stopping

__all__ = ["Sequential"]


@dataclass(frozen=True)
class Sequential(Solver):
    """x_t = f_t(x_<t) for t = 0, 1, ..., T-1, one position per step.

    Uses the problem's `stepper`, so a model with a cache or an incremental update (the
    strongest sequential baseline) is used when the problem offers one.

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="sequential")
        >>> sol.num_iters == x0.shape[1]
    """

    name: ClassVar[str] = "sequential"

    def solve(
        self,
        problem: Problem,
        *,
        atol: float = 0.0,
        rtol: float = 0.0,
        max_iters: int | None = None,
        record: bool = True,
        check_every: int = 1,
        raise_on_failure: bool = False,
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> Solution:
        T = problem.length
        check_stopping(atol, rtol, max_iters, check_every)  # same options as every method
        if max_iters is not None and max_iters < T:
            raise ValueError(f"sequential needs exactly T={T} steps; max_iters={max_iters}")
        s = _Canonical(problem.initial(), problem.dim)
        step = problem.stepper(s.x)
        for t in range(T):
            s.v[:, t : t + 1] = s.flat(step(t))
            if callback is not None:
                callback(t + 1, s.x)
        if not bool(torch.isfinite(s.v).all()):  # one host read, after the loop
            bad = (~torch.isfinite(s.v)).any(2).any(0).int().argmax()
            raise NonFiniteError(f"sequential: NaN or Inf in the result at position {int(bad)}")
        converged = torch.ones(s.B, dtype=torch.bool, device=s.x.device)
        cert = None
        if record:
            steps = torch.arange(1, T + 1, device=s.x.device)
            cert = steps[:, None].expand(T, s.B).clone()  # (T, B)
        return Solution(s.x, converged, T, T * problem.num_evals_per_step, None, cert, {})
