"""GS-Jacobi: blocks solved one after another, Jacobi inside each; or a sliding window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, Window, check_int, sliding_start
from ffsolve.solvers.jacobi_gs import _check_block

__all__ = ["GSJacobi"]


@dataclass(frozen=True)
class GSJacobi(Solver):
    """Jacobi restricted to a window of positions that only moves forward.

    With `block_size` K the window is the block [bK, (b+1)K) holding the first uncertified
    position (Song et al. 2021, Alg. 3); with `window` W it is [c, c + W) where c is the
    certified prefix, so it slides forward as soon as a position is final (as in ParaDiGMS).
    Near the end the window keeps its width and reaches back over certified positions (a
    last block [T - K, T)). Only the window is evaluated, so a problem with a cheap windowed
    `evaluate` pays less; where the window moves on the device (a captured loop, a problem
    with `window_on_device`), no host read is needed per sweep.

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

    def width(self, length: int) -> int:
        if self.block_size is not None:
            return self.block_size
        size = self.window if self.window is not None else math.isqrt(length - 1) + 1
        return min(size, length)

    def window_start(self, certified: Any, length: int) -> Any:
        if self.block_size is not None:  # the block holding the first uncertified position
            certified = certified // self.block_size * self.block_size
        return sliding_start(self.width(length), certified, length)

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        return window.evaluate(problem, state.x)
