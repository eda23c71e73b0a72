"""The problem protocol: a lower-triangular system x_t = f_t(x_<t) that solvers can sweep.

A problem owns the model and the fixed inputs (noise, data); a solver owns the iteration.
Solvers see positions through a canonical view of shape (B, T, F): leading dimensions are
flattened into the batch B, the position dimension is T, trailing dimensions into F.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Problem", "FunctionProblem", "canonical_shape"]


def canonical_shape(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    """(B, T, F) for a tensor of `shape` whose positions lie along `dim` (already normalised)."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


class Problem:
    """A triangular system the solvers can iterate on.

    Subclasses set `length` (T, the number of positions) and `dim`, and implement `initial`
    and `evaluate`. They may override `evaluate_at` (a strided set of positions, used by
    `jacobi_gs`) and `stepper` (a cached or incremental sequential step, used by
    `sequential`) when the model can do better than a full evaluation.

    The system: x_t = f_t(x_0, ..., x_{t-1}) for t = 0..T-1, where position t is index t of
    the state along `dim`.
    """

    length: int
    dim: int

    #: `evaluate` (and `evaluate_at`) on the full window have static shapes and read nothing
    #: on the host, so the solve loop may capture sweeps in a CUDA graph (`capture="auto"`).
    capturable: bool = False
    #: every `step(t)` of `stepper` has static shapes and reads nothing on the host, and
    #: `step(0)` starts over from the contents of `x` (a stepper can be replayed), so the
    #: whole sequential loop may be captured in one CUDA graph.
    capturable_stepper: bool = False

    def prepare(self) -> None:
        """Called once at the start of every solve, before any `evaluate` or `stepper`: bake
        what does not change during a solve (masks into weights, fused layouts), in place into
        buffers kept across solves, so a captured loop replayed later sees updated weights."""

    def initial(self) -> Tensor:
        """The starting iterate, a tensor with positions along `dim` (the solver copies it)."""
        raise NotImplementedError

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        """f at positions [start, stop) given the iterate x.

        Args:
            x: the current iterate, shaped like `initial()`.
            start, stop: the window of positions to compute.

        Returns:
            A tensor shaped like x narrowed to stop - start positions along `dim`.
        """
        raise NotImplementedError

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        """f at the positions in `index` (a 1-D long tensor, increasing), shaped like x with
        len(index) positions. The default evaluates the full window and selects."""
        return self.evaluate(x, 0, self.length).index_select(self.dim, index)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        """A sequential step for the ordinary loop: `step(t)` returns f_t (one position, shaped
        like x narrowed to 1 along `dim`) given that positions < t of `x` are final.

        The solver writes each result into `x` (in place) before asking for the next position,
        so an incremental implementation may keep a cache and read x[t - 1] from `x`.
        """
        return lambda t: self.evaluate(x, t, t + 1)

    @property
    def num_evals_per_step(self) -> int:
        """Model calls counted for one `evaluate` (overridable for problems that batch calls)."""
        return 1


class FunctionProblem(Problem):
    """A plain function as a triangular system: `fn(x)` returns every position at once.

    Position t of `fn(x)` (index t along `dim`) must depend only on positions < t of x.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x0: Tensor, dim: int = 1) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if not x0.dtype.is_floating_point:
            raise TypeError(f"x0 must have a floating dtype, got {x0.dtype}")
        if x0.dim() == 0:
            raise ValueError("x0 must have at least one dimension (the positions)")
        if not -x0.dim() <= dim < x0.dim():
            raise ValueError(f"dim={dim} is out of range for x0 with {x0.dim()} dimensions")
        self.fn = fn
        self.x0 = x0
        self.dim = dim % x0.dim()
        self.length = x0.shape[self.dim]
        if self.length == 0:
            raise ValueError("x0 has no positions along dim")

    def initial(self) -> Tensor:
        return self.x0

    def _call(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"fn must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"fn changed the shape: got {tuple(out.shape)}, expected {tuple(x.shape)}"
            )
        if out.dtype != x.dtype:
            raise ValueError(f"fn changed the dtype: got {out.dtype}, expected {x.dtype}")
        return out

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self._call(x).narrow(self.dim, start, stop - start)

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        return self._call(x).index_select(self.dim, index)
