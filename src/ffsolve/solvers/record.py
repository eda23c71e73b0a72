"""The result every method returns (`Solution`) and how a solve reports failure."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "DivergenceWarning",
    "NonFiniteError",
    "Solution",
    "first_nonfinite",
    "raise_nonfinite",
    "report_failure",
]


class ConvergenceError(RuntimeError):
    """A solve stopped at `max_iters` before every position was certified."""


class ConvergenceWarning(RuntimeWarning):
    """Issued when a solve stops at `max_iters` before convergence."""


class DivergenceWarning(ConvergenceWarning):
    """Newton steps were replaced by Jacobi steps (residual not reduced, or not finite)."""


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

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="jacobi")
        >>> sol.value, sol.all_converged, sol.num_iters, sol.stats["iters_per_item"]
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


def first_nonfinite(v: Tensor) -> int | None:
    """The first position (dim 1) of a (B, T, F) tensor holding NaN or Inf, or None."""
    bad = v.isfinite().logical_not_().any(2).any(0)  # (T,)
    return int(bad.int().argmax()) if bool(bad.any()) else None


def raise_nonfinite(
    name: str, v: Tensor, iteration: int, current: int | None = None, hint: str = ""
) -> None:
    """Raise `NonFiniteError` naming the method, the iteration and the first bad position of
    the iterate v (B, T, F); `current` is the iteration whose iterate v is, when later; `hint`
    says what the method knows about why (its `nonfinite_hint`)."""
    pos = first_nonfinite(v)
    where = f"position {pos}" if pos is not None else "a position no longer non-finite"
    if current is not None and current != iteration:
        where += f" (located in the iterate of iteration {current})"
    raise NonFiniteError(
        f"{name}: NaN or Inf in the iterate at iteration {iteration}, {where}"
        + (f"; {hint}" if hint else "")
    )


def report_failure(name: str, sol: Solution, max_iters: int, raise_on_failure: bool) -> None:
    """Warn (or raise, when asked) that `max_iters` was reached before convergence."""
    n_bad = int((~sol.converged).sum())
    msg = (
        f"{name} stopped at max_iters={max_iters} with {n_bad} of {sol.converged.numel()} "
        "batch items not converged; the value is the last iterate"
    )
    if raise_on_failure:
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=5)
