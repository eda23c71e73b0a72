"""Jacobi: every position updated at once from the previous iterate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, Window

__all__ = ["Jacobi"]


@dataclass(frozen=True)
class Jacobi(Solver):
    """x^{k+1}_t = f_t(x^k_<t) for all t in parallel (Song et al. 2021, Alg. 1).

    After k iterations the first k positions are exact, so at most T iterations are needed.

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="jacobi")
        >>> sol.num_iters <= x0.shape[1]
    """

    name: ClassVar[str] = "jacobi"

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        return window.evaluate(problem, state.x)
