"""The solver base class: a method is a small frozen object of hyper-parameters plus hooks.

The loop (`ffsolve.solvers.loop`) is shared by every method. A method says, through the hooks
below, which window of positions a sweep updates and how it computes the new values there;
the loop compares, certifies, counts, traces, stops and reports, identically for all.

| hook | what it says | default |
|---|---|---|
| `validate(length, stopping)` | check the hyper-parameters against T and the stopping | - |
| `default_max_iters(length)` | the budget that guarantees exactness | T |
| `width(length)` | n, the positions a sweep updates (< T: a window that moves) | T |
| `window_start(certified, length)` | where a moving window starts, from the certified prefix | - |
| `init(problem, state)` | per-solve memory: a dict of tensors the loop owns | None |
| `sweep(problem, state, window, memory)` | new values of the window, (B, n, F) | required |
| `guaranteed(certified, length)` | a certified prefix known from the method alone | none |
| `evals_per_sweep(problem, start, stop)` | model calls one sweep makes | the problem's |
| `finish(solution, memory)` | the record with the method's own stats (and warnings) | unchanged |
| `captures_with(problem)` | the problem declares this method's work capturable | `capturable` |

Class attributes: `capturable` (the sweep does no host-side work), `direct` (one sweep of the
whole sequence is the solution: `scan`, `sequential`), `writes_state` (a direct sweep writes
the state in place, so the loop gives it a copy), `host_every_sweep` (the memory must see
every sweep and only real ones: the host reads the flags after each sweep),
`residual_certificate` (the method's update is not its base map on a zero-residual prefix,
as Anderson's is not: `sweep` returns (new values, G(x)) for a base map G that equals
Jacobi's F on a zero-residual prefix and at the first nonzero residual; the loop certifies the
prefix where G(x) = x and gives the certified positions G(x), so the certificate and the
bound of T sweeps hold for any update rule).

A solver object is frozen and may be shared by many solves at once: everything that belongs
to one solve lives in the memory `init` returns, never on the solver. The memory is state in,
state out (optimistix's pattern): `sweep` gets a copy of the dict and puts NEW tensors under
its names (never writing the given ones in place); the loop commits them to its own buffers
under the same `live` mask as the iterate, so a sweep the loop has frozen changes nothing and
counts never depend on how often the host looks. A method whose memory is not tensors of
fixed shape declares `host_every_sweep` (and is not `capturable`); its new entries are kept as
returned.

The window: a method whose `width` is below T sweeps [s, s + n) with s = `window_start` of
the certified prefix (the minimum over the batch), an int on the host or a tensor on the
device (the same expression serves both). `sweep` reads and writes positions through the
`Window` it is given (`take`, `put`, `evaluate`, `positions`), never by slicing with ints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.loop import State, Stopping, Window, run
from ffsolve.solvers.record import Solution

__all__ = ["Solver", "State", "Window", "check_int", "sliding_start"]


@dataclass(frozen=True)
class Solver:
    """Base of every method: hyper-parameters and hooks (see the module docstring).

    Example:
        >>> sol = ffsolve.solve(fn, x0, method=Jacobi())
        >>> sol = Jacobi().solve(problem, atol=1e-6)
    """

    name: ClassVar[str] = ""
    #: the sweep has static shapes and does no host-side work (its chunks may be captured)
    capturable: ClassVar[bool] = True
    #: one sweep of the whole sequence IS the solution: the loop runs it once and certifies
    #: every position without comparing iterates
    direct: ClassVar[bool] = False
    #: a direct sweep writes the state in place (the loop then hands it a copy of the start)
    writes_state: ClassVar[bool] = False
    #: the method's memory must see exactly the sweeps that count (no frozen ones)
    host_every_sweep: ClassVar[bool] = False
    #: `sweep` returns (new values, F(x)) and the loop certifies on F(x) - x
    residual_certificate: ClassVar[bool] = False
    #: what a NaN/Inf in this method's iterate (from a finite model) usually means
    nonfinite_hint: ClassVar[str] = ""

    # --- the hooks ------------------------------------------------------------------------
    def validate(self, length: int, stopping: Stopping) -> None:
        """Check the hyper-parameters against the number of positions and the stopping rule."""

    def default_max_iters(self, length: int) -> int:
        return length

    def width(self, length: int) -> int:
        """The number of positions one sweep updates (fixed for a solve). Below `length`, the
        window moves with the certified prefix (`window_start`). Default: every position."""
        return length

    def window_start(self, certified: Any, length: int) -> Any:
        """The first position of the next sweep's window given the certified prefix (the
        minimum over the batch; a host int or a () device tensor, and the result of the same
        kind), at most `certified` (the window's inputs must be final) and at most
        length - width (the window has a fixed width)."""
        raise NotImplementedError(f"{self.name} has no moving window")

    def init(self, problem: Problem, state: State) -> Any:
        """Per-solve memory: a dict of tensors (see the module docstring), or None."""
        return None

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        """New values for the window's positions, (B, n, F). An iterative method must not
        write the state (the loop does, once the values are compared) nor its memory's
        tensors (it puts new ones in the dict)."""
        raise NotImplementedError

    def guaranteed(self, certified: Tensor, length: int) -> Tensor:
        """A lower bound on the certified prefix after one sweep whose window starts inside
        `certified`, known from the method alone (beyond the measured one-position rule)."""
        return certified

    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int:
        return problem.num_evals_per_step

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """The record with this method's own stats; may warn. Default: unchanged."""
        return solution

    def captures_with(self, problem: Problem) -> bool:
        """The problem declares the work this method replays capturable."""
        return bool(problem.capturable)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # --- running it ---------------------------------------------------------------------
    def solve(
        self, problem: Problem, stopping: Stopping | None = None, *, callback=None, **fields
    ) -> Solution:
        """Solve `problem` by this method in the shared loop.

        Args:
            problem: a `ffsolve.problems.Problem`.
            stopping: a `Stopping`; or give its fields as keywords (atol=..., record=...).
            callback: called as callback(k, x) after sweep k with the live iterate.
        """
        return run(self, problem, Stopping.merged(stopping, **fields), callback)


def sliding_start(window: int, certified: Any, length: int) -> Any:
    """The start of a window of `window` positions sliding over the certified prefix, kept
    inside the sequence (near the end it reaches back over certified positions, which the
    loop leaves alone): min(certified, length - window), for an int or a device tensor."""
    last = max(length - window, 0)
    if isinstance(certified, Tensor):
        return certified.clamp(max=last)
    return min(certified, last)


def check_int(name: str, value: Any, low: int = 1, high: float = math.inf) -> None:
    """TypeError unless `value` is an int (not a bool); ValueError unless low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        bound = f"between {low} and {high}" if high != math.inf else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
