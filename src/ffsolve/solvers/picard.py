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

Safeguard: the lagged part can grow without bound where the steps are far from their linear
part (a trained GRU over its whole length; a small DDPM's DDIM steps over a window of 32 or
more overflowed to NaN within 29-44 sweeps). A position whose update is not finite or larger
than `guard` times the scale of F(x) there takes F(x) (Jacobi's step) instead, counted per item in
`stats["picard_fallbacks"]`. Exact either way (on a zero-residual prefix both are F(x));
`fallback=False` turns it off, and an overflow then raises `NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import LinearRecurrence, Problem
from ffsolve.solvers.base import Solver, State, Window, check_int, sliding_start
from ffsolve.solvers.record import Solution
from ffsolve.solvers.scan import affine_scan

__all__ = ["Picard", "guarded"]


def guarded(new: Tensor, safe: Tensor, guard: float) -> tuple[Tensor, Tensor]:
    """`new` (B, n, F) where, per position, it is finite and max|new| <= guard * (max|safe| + 1);
    `safe` elsewhere. Returns the result and the positions that took `safe` (B, n)."""
    if math.isinf(guard):
        bad = ~torch.isfinite(new).all(-1)
    else:  # NaN compares false: bad too
        bad = ~(new.abs().amax(-1) <= guard * (safe.abs().amax(-1) + 1.0))
    return torch.where(bad[..., None], safe, new), bad


def check_guard(guard: float) -> None:
    if not guard > 1.0:  # NaN fails too
        raise ValueError(f"guard must be > 1 (inf: only non-finite updates), got {guard}")


@dataclass(frozen=True)
class Picard(Solver):
    """x_new_t = A_t x_new_{t-1} + (f_t(x_{t-1}) - A_t x_{t-1}) over a window (module doc).

    Needs a first-order problem (`Problem.first_order`). At most T sweeps, like Jacobi.

    Attributes:
        window: positions per sweep, sliding over the certified prefix (ParaDiGMS's
            `parallel`); None: every position at once (a static window: capturable).
        linear: "identity" (ParaDiGMS) or "problem" (the problem's `linear_part`).
        fallback, guard: the safeguard (module doc): F(x) where the update is not finite or
            above guard * (max|F(x)| + 1) at a position.

    Example:
        >>> sol = ffsolve.solve(DiffusionSampling(unet, sched, noise), method="picard",
        ...                     window=64, atol=0.1, rule="variance")
    """

    name: ClassVar[str] = "picard"
    nonfinite_hint: ClassVar[str] = (
        "with fallback=False the identity linearisation may diverge on strongly coupled "
        "systems (a trained GRU does, over its whole length): the default fallback, a window "
        "(e.g. window=16) or jacobi avoid it; with the fallback on, the problem's own step "
        "returned NaN or Inf"
    )
    window: int | None = None
    linear: str = "identity"
    fallback: bool = True
    guard: float = 10.0

    def validate(self, length: int, stopping: Any) -> None:
        if self.window is not None:
            check_int("window", self.window)
        if self.linear not in ("identity", "problem"):
            raise ValueError(f"linear must be 'identity' or 'problem', got {self.linear!r}")
        check_guard(self.guard)

    def width(self, length: int) -> int:
        return length if self.window is None else min(self.window, length)

    def window_start(self, certified: Any, length: int) -> Any:
        return sliding_start(self.width(length), certified, length)

    def init(self, problem: Problem, state: State) -> dict[str, Tensor]:
        if not problem.first_order:
            raise TypeError(
                f"picard needs a first-order problem (x_t = f_t(x_{{t-1}})); "
                f"{type(problem).__name__} is not declared one"
            )
        # the safeguard's count per item
        return {"fallbacks": state.v.new_zeros(state.B, dtype=torch.long)}

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        fx = state.flat(window.evaluate(problem, state.x))  # (B, n, F): f_t(x_{t-1})
        r = fx - window.take(state.v)  # (B, n, F): the residual
        A = problem.linear_part(0, state.T) if self.linear == "problem" else None
        if A is None:  # the identity: the linear recurrence is a cumulative sum
            d = torch.cumsum(r, dim=1)
        else:
            A = torch.as_tensor(A, dtype=r.dtype, device=r.device)
            A = window.take(A.reshape(-1, state.T, A.shape[-1] if A.dim() > 1 else 1))
            A = A.expand(r.shape).contiguous()  # (B, n, F): a diagonal A_t
            d = affine_scan(LinearRecurrence(r, lambda s, e: A[:, s:e], "diagonal"))
        new = fx + (d - r)  # bitwise f_t(x_{t-1}) wherever the residual prefix is zero
        if not self.fallback:
            return new
        new, bad = guarded(new, fx, self.guard)
        if memory is not None:  # None: called outside the loop
            memory["fallbacks"] = memory["fallbacks"] + bad.sum(1)
        return new

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """`stats["picard_fallbacks"]`: positions per item that took F(x) (module doc)."""
        stats = {**solution.stats, "picard_fallbacks": memory["fallbacks"].tolist()}
        return dataclasses.replace(solution, stats=stats)
