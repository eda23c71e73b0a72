"""picard: Picard iteration over a sliding window (ParaDiGMS, Shih et al. 2023), written as
Newton's update with each step's Jacobian replaced by its linear part.

For a first-order system x_t = f_t(x_{t-1}) whose steps are f_t(x) = A_t x + d_t(x), one
sweep over the window [s, e) (positions < s certified) computes, from the iterate x,

    r_t = f_t(x_{t-1}) - x_t,    d_t = A_t d_{t-1} + r_t  (d_{s-1} = 0),
    x_new_t = f_t(x_{t-1}) + (d_t - r_t)  (= A_t x_new_{t-1} + d_t(x_{t-1})),

the linear part solved exactly (a cumulative sum for A = I, else the scan) and the rest lagged
one sweep. With A = I (the default) this is ParaDiGMS's update,
x_new_t = x_{s-1} + sum_{j=s..t} (f_j(x_{j-1}) - x_{j-1}); `linear="problem"` takes the
problem's own linear part (`Problem.linear_part`, e.g. a DDPM step's 1 / sqrt(alpha_t)).

Exactness: on a zero-residual prefix of the window d and r are exact zeros, so the update is
bitwise f_t(x_{t-1}) there and at the first nonzero residual; an unchanged prefix is therefore
a zero-residual one, and the loop's certificate (and Jacobi's bound of T sweeps) holds.
With `Stopping(rule="variance")` the window advances as ParaDiGMS's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import LinearRecurrence, Problem
from ffsolve.solvers.base import Solver, State, check_int
from ffsolve.solvers.scan import affine_scan

__all__ = ["Picard", "window_region"]


def window_region(window: int | None, certified: int, length: int) -> tuple[int, int]:
    """[c, c + window) clipped to the length (every position when window is None)."""
    if window is None:
        return 0, length
    return certified, min(length, certified + window)


@dataclass(frozen=True)
class Picard(Solver):
    """x_new_t = A_t x_new_{t-1} + (f_t(x_{t-1}) - A_t x_{t-1}) over a window (module doc).

    Needs a first-order problem (`Problem.first_order`). At most T sweeps, like Jacobi.

    Attributes:
        window: positions per sweep, sliding over the certified prefix (ParaDiGMS's
            `parallel`); None: every position at once (a static window: capturable).
        linear: "identity" (ParaDiGMS) or "problem" (the problem's `linear_part`).

    Example:
        >>> sol = ffsolve.solve(DiffusionSampling(unet, sched, noise), method="picard",
        ...                     window=64, atol=0.1, rule="variance")
    """

    name: ClassVar[str] = "picard"
    nonfinite_hint: ClassVar[str] = (
        "the identity linearisation diverges on strongly coupled systems (a trained GRU does, "
        "over its whole length): a window (e.g. window=64) bounds how far it reaches, or use "
        "jacobi"
    )
    window: int | None = None
    linear: str = "identity"

    def validate(self, length: int, stopping: Any) -> None:
        if self.window is not None:
            check_int("window", self.window)
        if self.linear not in ("identity", "problem"):
            raise ValueError(f"linear must be 'identity' or 'problem', got {self.linear!r}")

    def static_region(self) -> bool:
        return self.window is None

    def region(self, certified: int, length: int) -> tuple[int, int]:
        return window_region(self.window, certified, length)

    def init(self, problem: Problem, state: State) -> None:
        if not problem.first_order:
            raise TypeError(
                f"picard needs a first-order problem (x_t = f_t(x_{{t-1}})); "
                f"{type(problem).__name__} is not declared one"
            )

    def sweep(self, problem: Problem, state: State, start: int, stop: int, memory: Any) -> Tensor:
        fx = state.flat(problem.evaluate(state.x, start, stop))  # (B, n, F): f_t(x_{t-1})
        r = fx - state.v[:, start:stop]  # (B, n, F): the residual
        A = problem.linear_part(start, stop) if self.linear == "problem" else None
        if A is None:  # the identity: the linear recurrence is a cumulative sum
            d = torch.cumsum(r, dim=1)
        else:
            A = torch.as_tensor(A, dtype=r.dtype, device=r.device)
            A = A.reshape(-1, stop - start, A.shape[-1] if A.dim() > 1 else 1)
            A = A.expand(r.shape).contiguous()  # (B, n, F): a diagonal A_t
            d = affine_scan(LinearRecurrence(r, lambda s, e: A[:, s:e], "diagonal"))
        return fx + (d - r)  # bitwise f_t(x_{t-1}) wherever the residual prefix is zero
