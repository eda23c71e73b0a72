"""The ordinary sequential loop (Gauss-Seidel in natural order): the reference and baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, Window
from ffsolve.solvers.record import Solution

__all__ = ["Sequential"]


@dataclass(frozen=True)
class Sequential(Solver):
    """x_t = f_t(x_<t) for t = 0, 1, ..., T-1, one position per step.

    Uses the problem's `stepper`, so a model with a cache or an incremental update (the
    strongest sequential baseline) is used when the problem offers one. In the loop it is a
    direct method: its one sweep is the T steps, and with `capture` the whole loop is one
    CUDA graph (when the problem declares its stepper capturable).

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="sequential")
        >>> sol.num_iters == x0.shape[1]
    """

    name: ClassVar[str] = "sequential"
    direct: ClassVar[bool] = True
    writes_state: ClassVar[bool] = True  # each step's value is written before the next step

    def validate(self, length: int, stopping: Any) -> None:
        if stopping.max_iters is not None and stopping.max_iters < length:
            raise ValueError(
                f"sequential needs exactly T={length} steps; max_iters={stopping.max_iters}"
            )

    def captures_with(self, problem: Problem) -> bool:
        return bool(problem.capturable_stepper)

    def init(self, problem: Problem, state: State) -> Callable[[int], Tensor]:
        # host work of the stepper (if any) happens here, once per captured loop
        return problem.stepper(state.x)

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        step = memory
        for t in range(problem.length):
            state.v[:, t : t + 1] = state.flat(step(t))
        return state.v

    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int:
        return problem.length * problem.num_evals_per_step

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """The record of T sequential steps: no residual trace, one certified position per
        step."""
        B = solution.converged.numel()
        T = solution.stats["certified_final"][0]
        cert = None
        if solution.certified is not None:
            steps = torch.arange(1, T + 1, device=solution.value.device)
            cert = steps[:, None].expand(T, B).clone()  # (T, B)
        stats = {k: solution.stats[k] for k in ("captured", "capture_failed")
                 if k in solution.stats}  # fmt: skip
        return dataclasses.replace(
            solution, num_iters=T, residuals=None, certified=cert, stats=stats
        )
