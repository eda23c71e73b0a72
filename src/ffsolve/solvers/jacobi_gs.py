"""Jacobi-GS: Jacobi across blocks, sequential (Gauss-Seidel) sweeps inside each block."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, Window

__all__ = ["JacobiGS"]


@dataclass(frozen=True)
class JacobiGS(Solver):
    """Blocks of `block_size` positions; one iteration makes `block_size` inner steps, step j
    updating position j of every block at once from the freshest values (Song et al. 2021,
    Alg. 2). At most ceil(T / block_size) iterations.

    Args:
        block_size: positions per block; None picks ceil(sqrt(T)).

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="jacobi_gs", block_size=28)
        >>> sol.num_evals == 28 * sol.num_iters
    """

    name: ClassVar[str] = "jacobi_gs"
    block_size: int | None = None

    def size(self, length: int) -> int:
        return self.block_size if self.block_size is not None else math.isqrt(length - 1) + 1

    def validate(self, length: int, stopping: Any) -> None:
        _check_block(self.block_size, length)

    def default_max_iters(self, length: int) -> int:
        return -(-length // self.size(length))

    def guaranteed(self, certified: Tensor, length: int) -> Tensor:
        # The block holding the first uncertified position is swept sequentially from
        # certified inputs, so the whole block becomes final in one iteration.
        K = self.size(length)
        return torch.clamp((certified // K + 1) * K, max=length)

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        # the problem may offer a cheaper sweep (e.g. cached steps); the default makes
        # block_size calls of evaluate_at, each at position j of every block
        return problem.block_sweep(state.x, self.size(problem.length))

    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int:
        return problem.block_sweep_evals(self.size(problem.length))


def _check_block(block_size: int | None, length: int) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if not 1 <= block_size <= length:
        raise ValueError(f"block_size must be between 1 and the length {length}, got {block_size}")
