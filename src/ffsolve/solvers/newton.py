"""newton and quasi_newton: Newton's method over the whole sequence (DEER, Lim et al. 2024;
quasi-DEER, Gonzalez et al. 2024), each linear step solved by the associative scan.

For a first-order system x_t = f_t(x_{t-1}), let F(x)_t = f_t(x_{t-1}) (one Jacobi sweep),
r = F(x) - x and J_t = d f_t / d x_{t-1} at the iterate. Linearising f around x, the Newton
correction d = x_new - x solves the linear recurrence

    d_t = J_t d_{t-1} + r_t,    d_{-1} = 0,

and the update is written x_new_t = F(x)_t + (d_t - r_t) (= F(x)_t + J_t d_{t-1}).

Why this form keeps the shared certificate valid (and bounds Newton by T iterations like
Jacobi): if r_s = 0 for every s < t, then d_s is exactly zero for s < t (the scan only adds
products with a zero factor) and x_new_t = F(x)_t + (r_t - r_t) = F(x)_t bitwise. So on an
unchanged prefix, and at the first changed position, a Newton step IS a Jacobi step, and the
loop's certificate (unchanged prefix plus the first changed position are final) holds as for
Jacobi. `quasi_newton` keeps only diag(J_t) (O(B T F) memory); `damping` scales J by
(1 - damping), moving from Newton (0) to Jacobi (1): a simple stand-in for ELK's trust region,
not ELK's Kalman smoother.

Safeguards (always counted in `Solution.stats`; a `DivergenceWarning` when any Newton step was
not finite or an item fell back on more than a quarter of its sweeps): a batch item whose
residual max|F(x) - x| did not decrease since the previous sweep takes a Jacobi step instead;
an item whose Newton step is not finite, or larger than `guard` times the scale of the states
(a linearisation far outside its region of validity, e.g. around a saturated tanh: the step
would be taken before the residual test could reject it), takes the Jacobi step too. Each
choice is per item and both steps are maps of the current iterate that equal F(x) on a
zero-residual prefix, so the certificate is unaffected. Once the residual is
rounding noise (8 ulps of the states), Jacobi steps finish the certificate (`polish`). With
`fallback=False` neither happens, and a non-finite step raises `NonFiniteError` naming the
iteration and position.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import LinearRecurrence, Problem
from ffsolve.solvers.base import Solver, State, Window, check_int
from ffsolve.solvers.record import DivergenceWarning, Solution
from ffsolve.solvers.scan import affine_scan

__all__ = ["DivergenceWarning", "Newton", "QuasiNewton"]


@dataclass
class _Safeguards:
    """The per-solve record of the Newton safeguards (the solver's memory)."""

    prev: Tensor | None = None  # (B,) residual of the previous sweep's iterate
    fallbacks: Tensor | None = None  # (B,) Jacobi steps taken (residual not reduced)
    nonfinite: Tensor | None = None  # (B,) Newton steps that were not finite
    blowups: Tensor | None = None  # (B,) Newton steps rejected by the guard
    residual: list[Tensor] = field(default_factory=list)  # per sweep, (B,) max|F(x) - x|


@dataclass(frozen=True)
class Newton(Solver):
    """DEER: x_new = F(x) + (d - r), d_t = J_t d_{t-1} + r_t solved by the scan (module doc).

    Needs a first-order problem (`Problem.first_order`, `Problem.jacobians`), e.g.
    `RecurrenceForward`. At most T iterations, like Jacobi; exact with zero tolerances.

    Attributes:
        damping: in [0, 1]; J is scaled by (1 - damping) (1 gives Jacobi).
        chunk: time steps per chunk of Jacobians (None: about 2^25 coefficients per chunk).
        fallback: take a Jacobi step where a Newton step did not reduce the residual, was
            not finite, or blew up (counted in `stats`, warned about).
        guard: a Newton step of an item larger than guard * (max|F(x)| + max|x| + 1) is a
            blow-up, replaced by the Jacobi step before it is taken (default inf: no guard).
            It helps where a blown-up state persists (a GRU keeps part of its state); where
            the cell saturates it can cost iterations: on h_t = tanh(20 h_{t-1}) + 0.01 x_t
            (T = 40) unguarded Newton takes a 1e48 step and still converges in 4 iterations,
            guard=10 never leaves [-1.1, 1.1] but needs 23, like Jacobi.
        polish: take Jacobi steps once the residual is rounding noise (8 ulps of the states),
            where a Newton correction is noise too.

    Example:
        >>> sol = ffsolve.solve(RecurrenceForward(cell, h0, xs), method="newton")
        >>> sol.num_iters, sol.stats["newton_fallbacks"]
    """

    name: ClassVar[str] = "newton"
    diagonal: ClassVar[bool] = False
    # the safeguards keep per-solve records on the host side: never captured; they compare
    # consecutive sweeps, so the host reads the flags after every sweep (a frozen sweep past
    # convergence would otherwise count as one that did not reduce the residual)
    capturable: ClassVar[bool] = False
    host_every_sweep: ClassVar[bool] = True
    damping: float = 0.0
    chunk: int | None = None
    fallback: bool = True
    polish: bool = True
    guard: float = float("inf")

    def validate(self, length: int, stopping: Any) -> None:
        if not 0.0 <= self.damping <= 1.0:
            raise ValueError(f"damping must be in [0, 1], got {self.damping}")
        if self.chunk is not None:
            check_int("chunk", self.chunk)
        if not self.guard > 1.0:  # NaN fails too
            raise ValueError(f"guard must be > 1 (inf: no guard), got {self.guard}")

    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int:
        # one call for F(x), one for the Jacobians (F batched VJPs of it, or a formula)
        return 2 * problem.num_evals_per_step

    def init(self, problem: Problem, state: State) -> dict[str, Any]:
        if not problem.first_order:
            raise TypeError(
                f"{self.name} needs a first-order problem (x_t = f_t(x_{{t-1}})); "
                f"{type(problem).__name__} is not declared one"
            )
        return {"track": _Safeguards()}  # host-side records (host_every_sweep)

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        T = state.T
        x = state.v  # (B, T, F)
        fx = state.flat(problem.evaluate(state.x, 0, T))  # (B, T, F): one Jacobi sweep
        r = fx - x  # (B, T, F)
        kind = "diagonal" if self.diagonal else "dense"

        def coeffs(s: int, e: int) -> Tensor:
            return problem.jacobians(state.x, s, e, self.diagonal)

        scale = 1.0 - self.damping
        transform: Callable[[Tensor], Tensor] | None = (
            None if self.damping == 0 else (lambda A: A * scale)
        )
        scan = functools.partial(affine_scan, chunk=self.chunk, transform=transform)
        d = problem.solve_recurrence(LinearRecurrence(r, coeffs, kind), scan)  # (B, T, F)
        new = fx + (d - r)  # = F(x) bitwise wherever the residual prefix is zero
        track: _Safeguards | None = None if memory is None else memory["track"]
        if track is None:  # called outside the loop (no per-solve record): plain Newton
            return new
        res = r.abs().amax(dim=(1, 2))  # (B,)
        # below a few ulps of the states the residual is rounding noise: no Newton step can
        # reduce it reliably, and Jacobi steps then certify what is left (not counted)
        eps = torch.finfo(fx.dtype).eps
        noise = res <= 8 * eps * fx.abs().amax(dim=(1, 2)).clamp_min(1.0)  # (B,)
        jacobi = noise & bool(self.polish)  # (B,) items that take the Jacobi step
        if self.fallback:
            finite = torch.isfinite(new).all(2).all(1)  # (B,)
            worse = torch.zeros_like(finite)
            if track.prev is not None:
                worse = (res >= track.prev) & ~noise
            blowup = torch.zeros_like(finite)
            if self.guard != float("inf"):
                scale = torch.maximum(fx.abs().amax(dim=(1, 2)), x.abs().amax(dim=(1, 2)))
                blowup = finite & (new.abs().amax(dim=(1, 2)) > self.guard * (scale + 1.0))
            jacobi = jacobi | worse | ~finite | blowup
            zero = torch.zeros_like(res, dtype=torch.long)
            track.blowups = (zero if track.blowups is None else track.blowups) + blowup.long()
            track.fallbacks = (zero if track.fallbacks is None else track.fallbacks) + worse.long()
            track.nonfinite = (zero if track.nonfinite is None else track.nonfinite) + (
                ~finite & torch.isfinite(fx).all(2).all(1)
            ).long()
        track.prev = res
        track.residual.append(res)
        return torch.where(jacobi[:, None, None], fx, new)

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """The safeguards' record in `stats`: `newton_fallbacks`, `newton_nonfinite` and
        `newton_blowups` per item, `newton_residual` (per sweep, max over items of
        max|F(x) - x|); a `DivergenceWarning` when Newton was diverging."""
        track: _Safeguards = memory["track"]
        B = solution.converged.numel()
        fb = track.fallbacks.tolist() if track.fallbacks is not None else [0] * B
        nf = track.nonfinite.tolist() if track.nonfinite is not None else [0] * B
        bu = track.blowups.tolist() if track.blowups is not None else [0] * B
        res = torch.stack(track.residual).amax(1).tolist() if track.residual else []
        stats = {
            **solution.stats,
            "newton_fallbacks": fb,
            "newton_nonfinite": nf,
            "newton_blowups": bu,
            "newton_residual": res,
        }
        # an occasional fallback is routine (the max-norm residual of a converging Newton
        # iteration may grow for a step); a non-finite step, or fallbacks on more than a
        # quarter of an item's sweeps, mean Newton is diverging there: said loudly
        its = solution.stats["iters_per_item"]
        if sum(nf) or sum(bu) or any(f >= 2 and 4 * f > k for f, k in zip(fb, its, strict=True)):
            warnings.warn(
                f"{self.name}: {sum(fb)} Newton step(s) did not reduce the residual, "
                f"{sum(nf)} were not finite and {sum(bu)} blew up (guard); Jacobi steps were "
                "taken instead (the result is "
                "still exact when converged; see stats['newton_fallbacks'])",
                DivergenceWarning,
                stacklevel=5,
            )
        return dataclasses.replace(solution, stats=stats)


@dataclass(frozen=True)
class QuasiNewton(Newton):
    """quasi-DEER: Newton with diag(J_t) only, O(B T F) memory for the linear step.

    Example:
        >>> sol = ffsolve.solve(RecurrenceForward(cell, h0, xs), method="quasi_newton")
    """

    name: ClassVar[str] = "quasi_newton"
    diagonal: ClassVar[bool] = True
