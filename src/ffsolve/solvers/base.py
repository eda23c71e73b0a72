"""The one iteration loop, the Solution record and the solver base class.

Every parallel solver is a small frozen object that says which window of positions one
iteration updates (`region`) and how it computes the new values there (`sweep`). The loop
in `Solver.solve` does the rest, identically for every method: compare the new values with
the old, track the certified prefix, record traces, stop online, detect NaN/Inf.

Certificate (zero tolerance). If positions < p are unchanged between two iterates, they are
final (each was recomputed from final inputs and came out the same), and so is position p,
whose inputs are exactly those final positions. Hence after an iteration whose window
starts inside the certified prefix c, the new certified prefix is
max(c, start + p + 1) where p is the unchanged prefix of the window. It grows by at least
one position per iteration, so Jacobi needs at most T iterations (Song et al. 2021, Prop. 1)
and no extra confirming sweep is ever needed past that bound.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem, canonical_shape

__all__ = [
    "Solution",
    "Solver",
    "ConvergenceError",
    "ConvergenceWarning",
    "NonFiniteError",
    "check_stopping",
]


class ConvergenceError(RuntimeError):
    """A solve stopped at `max_iters` before every position was certified."""


class ConvergenceWarning(RuntimeWarning):
    """Issued when a solve stops at `max_iters` before convergence."""


class NonFiniteError(FloatingPointError):
    """An iterate contained NaN or Inf."""


@dataclass(frozen=True)
class Solution:
    """The result of every method.

    Attributes:
        value: the final iterate, shaped like the problem's state.
        converged: (B,) bool, per batch item: every position certified.
        num_iters: parallel iterations (sweeps) made until every item converged, or
            `max_iters`; for `sequential`, the number of sequential steps (T).
        num_evals: calls of the function or model actually made.
        residuals: (num_iters, B) max-abs forward difference per iteration and batch item,
            or None when recording was off (or for `sequential`).
        certified: (num_iters, B) certified prefix length per iteration, or None.
        stats: method extras (e.g. `iters_per_item`, block size, window).
    """

    value: Tensor
    converged: Tensor
    num_iters: int
    num_evals: int
    residuals: Tensor | None = None
    certified: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """True when every batch item converged."""
        return bool(self.converged.all())


class _Canonical:
    """A contiguous state with a (B, T, F) view that aliases it."""

    def __init__(self, x: Tensor, dim: int) -> None:
        if x.numel() == 0:  # a view of zero elements cannot be reshaped to (B, T, F)
            raise ValueError(
                f"the initial iterate of shape {tuple(x.shape)} is empty (a zero-size batch or "
                "feature dimension): nothing to solve"
            )
        self.x = x.detach().clone(memory_format=torch.contiguous_format)
        self.dim = dim
        self.shape = self.x.shape
        self.B, self.T, self.F = canonical_shape(self.shape, dim)
        self.v = self.x.view(self.B, self.T, self.F)  # (B, T, F), shares memory with x

    def flat(self, values: Tensor) -> Tensor:
        """A tensor shaped like the state with n positions -> (B, n, F)."""
        return values.reshape(self.B, -1, self.F)


@dataclass(frozen=True)
class Solver:
    """Base of every method: hyper-parameters only, the loop is shared.

    Subclasses define `name`, `region` and `sweep`; the sequential method overrides `solve`.
    """

    name: ClassVar[str] = ""

    # --- what a parallel method defines -------------------------------------------------
    def validate(self, length: int) -> None:
        """Check the hyper-parameters against the number of positions."""

    def region(self, certified: int, length: int) -> tuple[int, int]:
        """The window [start, stop) the next iteration updates, given the certified prefix
        (the minimum over the batch). The default is every position (Jacobi)."""
        return 0, length

    def sweep(self, problem: Problem, state: _Canonical, start: int, stop: int) -> Tensor:
        """New values for positions [start, stop), (B, stop - start, F); must not write the
        state. `evals_per_sweep` says how many model calls it makes."""
        raise NotImplementedError

    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int:
        return problem.num_evals_per_step

    def guaranteed(self, certified: Tensor, length: int) -> Tensor:
        """A lower bound on the certified prefix after one iteration whose window starts inside
        `certified`, known from the method alone (beyond the measured one-position rule)."""
        return certified

    def static_region(self) -> bool:
        """True when `region` ignores the certified prefix (no host read needed per sweep)."""
        return True

    def default_max_iters(self, length: int) -> int:
        return length

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _raise_nonfinite(self, state: _Canonical, iteration: int, current: int) -> None:
        pos = _first_nonfinite(state.v)
        where = f"position {pos}" if pos is not None else "a position no longer non-finite"
        if iteration != current:
            where += f" (located in the iterate of iteration {current})"
        raise NonFiniteError(
            f"{self.name}: NaN or Inf in the iterate at iteration {iteration}, {where}"
        )

    # --- the one loop ------------------------------------------------------------------
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
        """Iterate until every position of every batch item is certified, or `max_iters`."""
        T = problem.length
        self.validate(T)
        check_stopping(atol, rtol, max_iters, check_every)
        if max_iters is None:
            max_iters = self.default_max_iters(T)

        s = _Canonical(problem.initial(), problem.dim)
        if not bool(torch.isfinite(s.v).all()):
            raise NonFiniteError(f"{self.name}: the initial iterate holds NaN or Inf")
        device = s.x.device
        B = s.B
        cert = torch.zeros(B, dtype=torch.long, device=device)  # certified prefix per item
        conv_iter = torch.full((B,), -1, dtype=torch.long, device=device)
        # Per iteration, the max-abs change of each item, (B,): the residual trace, and the
        # NaN/Inf detector (a non-finite value makes its item's entry non-finite).
        residuals: list[Tensor] = []
        checked = 0  # residuals[:checked] are known to be finite
        certified: list[Tensor] = []
        num_evals = 0
        cert_min = 0  # host copy, refreshed when the region depends on it
        k = 0
        all_done = False
        while k < max_iters:
            k += 1
            start, stop = self.region(cert_min, T)
            new = s.flat(self.sweep(problem, s, start, stop))  # (B, n, F)
            num_evals += self.evals_per_sweep(problem, start, stop)
            old = s.v[:, start:stop]  # (B, n, F)

            diff = (new - old).abs()  # (B, n, F)
            residuals.append(diff.amax(dim=(1, 2)))  # (B,)
            if atol == 0 and rtol == 0:
                same = (diff == 0).all(2)  # bitwise equality, the exact certificate
            else:
                same = (diff <= atol + rtol * new.abs()).all(2)  # (B, n)
            prefix = same.long().cumprod(1).sum(1)  # (B,) unchanged prefix of the window
            # the first changed position is final too: its inputs are all certified
            reach = torch.clamp(prefix + 1, max=stop - start) + start
            grown = torch.maximum(self.guaranteed(cert, T), reach)
            # only where the window's inputs are certified (always, for a window from 0)
            cert = grown if start == 0 else torch.where(cert >= start, grown, cert)
            done = cert >= T
            conv_iter = torch.where(done & (conv_iter < 0), k, conv_iter)
            s.v[:, start:stop] = new
            if record:
                certified.append(cert)  # a new tensor each iteration, never written in place
            if callback is not None:
                callback(k, s.x)

            if not self.static_region() or k % check_every == 0 or k == max_iters:
                recent = torch.stack(residuals[checked:])  # (m, B)
                finite = torch.isfinite(recent).all(1)  # (m,)
                ok, cert_min = torch.stack([finite.all().long(), cert.min()]).tolist()  # 1 sync
                if not ok:
                    self._raise_nonfinite(s, checked + int(finite.int().argmin()) + 1, k)
                checked = len(residuals)
                if not record:
                    residuals.clear()
                    checked = 0
                if cert_min >= T:
                    all_done = True
                    break

        converged = cert >= T
        num_iters = int(conv_iter.max()) if all_done else k
        stats: dict[str, Any] = {
            "iters_per_item": torch.where(conv_iter >= 0, conv_iter, k).tolist(),
            "certified_final": cert.tolist(),
            **self.options(),
        }
        if check_every > 1:
            stats["check_every"] = check_every
            stats["sweeps_run"] = k
        res = torch.stack(residuals)[:num_iters] if record else None  # (num_iters, B)
        cer = torch.stack(certified)[:num_iters] if record else None
        sol = Solution(s.x, converged, num_iters, num_evals, res, cer, stats)
        if not all_done:
            _report_failure(self.name, sol, max_iters, raise_on_failure)
        return sol


def check_stopping(atol: float, rtol: float, max_iters: int | None, check_every: int) -> None:
    """Validate the stopping options shared by every solve (and by callers that defer one).

    atol and rtol must be finite numbers >= 0 (NaN would never certify a position, inf would
    certify every one); max_iters (or None) and check_every ints >= 1.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    for name, value in (("max_iters", max_iters), ("check_every", check_every)):
        if value is None and name == "max_iters":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _first_nonfinite(v: Tensor) -> int | None:
    bad = (~torch.isfinite(v)).any(2).any(0)  # (T,)
    return int(bad.int().argmax()) if bool(bad.any()) else None


def _report_failure(name: str, sol: Solution, max_iters: int, raise_on_failure: bool) -> None:
    n_bad = int((~sol.converged).sum())
    msg = (
        f"{name} stopped at max_iters={max_iters} with {n_bad} of {sol.converged.numel()} "
        "batch items not converged; the value is the last iterate"
    )
    if raise_on_failure:
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)
