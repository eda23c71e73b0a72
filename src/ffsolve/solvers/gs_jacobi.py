"""GS-Jacobi: blocks solved one after another, Jacobi inside each; or a sliding window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, check_int
from ffsolve.solvers.jacobi_gs import _check_block

__all__ = ["GSJacobi"]


@dataclass(frozen=True)
class GSJacobi(Solver):
    """Jacobi restricted to a window of positions that only moves forward.

    With `block_size` K the window is the block [bK, (b+1)K) holding the first uncertified
    position (Song et al. 2021, Alg. 3); with `window` W it is [c, c + W) where c is the
    certified prefix, so it slides forward as soon as a position is final (as in ParaDiGMS).
    Only the window is evaluated, so a problem with a cheap windowed `evaluate` pays less.

    Args:
        block_size: fixed blocks of this many positions.
        window: a sliding window of this many positions. Give at most one of the two;
            with neither, window = ceil(sqrt(T)).

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="gs_jacobi", window=32)
        >>> sol.num_iters <= x0.shape[1]
    """

    name: ClassVar[str] = "gs_jacobi"
    block_size: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.block_size is not None and self.window is not None:
            raise ValueError("gs_jacobi takes block_size or window, not both")

    def validate(self, length: int, stopping: Any) -> None:
        _check_block(self.block_size, length)
        if self.window is not None:
            check_int("window", self.window)

    def static_region(self) -> bool:
        return False

    def region(self, certified: int, length: int) -> tuple[int, int]:
        if self.block_size is not None:
            start = certified // self.block_size * self.block_size
            return start, min(length, start + self.block_size)
        size = self.window if self.window is not None else math.isqrt(length - 1) + 1
        return certified, min(length, certified + size)

    def sweep(self, problem: Problem, state: State, start: int, stop: int, memory: Any) -> Tensor:
        return problem.evaluate(state.x, start, stop)
