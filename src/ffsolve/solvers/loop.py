"""The one iteration loop: stopping rule, device step, host driver, capture.

Every method runs here. The work is split in two:

- the device step (`_Loop.step`): (state, certificate) -> (state, certificate), in place on
  persistent buffers, with static shapes, no host read and no Python branch on a tensor
  value, so that a chunk of steps can be captured in a CUDA graph and replayed;
- the host driver (`run`): runs the step `check_every` times per chunk (eagerly, or as one
  graph replay), reads one small tensor per chunk, raises on NaN/Inf, and turns the
  certificate into a `Solution`. The step freezes itself once done, so the iteration count,
  value and traces are those of stopping exactly at convergence, whatever the chunk.

A window method sweeps n < T positions from `window_start` of the certified prefix: inside
the step from the device certificate (a captured loop, or a problem with `window_on_device`),
so chunks of sweeps replay with no host read, or from the host's last read (an eager loop
over a problem whose windows want host ints). Per-solve memory (a method's history and
counters, the window's frontier) lives in the loop's buffers and is committed under the same
`live` mask as the iterate: a frozen step changes nothing at all.

A direct method (`scan`, `sequential`: one sweep of the whole sequence is the solution) is the
same loop with one step and a lighter bookkeeping: no comparison of iterates, every position
certified, one norm that doubles as the NaN/Inf flag.

Certificate (zero tolerance). If positions < p are unchanged between two iterates, they are
final (each was recomputed from final inputs and came out the same), and so is position p,
whose inputs are exactly those final positions. Hence after an iteration whose window starts
inside the certified prefix c, the new certified prefix is max(c, start + p + 1) where p is
the unchanged prefix of the window. It grows by at least one position per iteration, so
Jacobi needs at most T iterations (Song et al. 2021, Prop. 1) and no extra confirming sweep is
ever needed past that bound.

`Stopping` holds the options of this loop; it is the only module that reads them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ffsolve import graphs
from ffsolve.problems.base import Problem, canonical_shape
from ffsolve.solvers.record import NonFiniteError, Solution, raise_nonfinite, report_failure

__all__ = [
    "DEFAULT_CHUNKS",
    "Method",
    "State",
    "Stopping",
    "Window",
    "captures",
    "direct_value",
    "run",
]

#: The tolerance rules of `Stopping.rule`.
RULES = ("elementwise", "variance")

#: Sweeps per host read (and per CUDA-graph replay) when the loop is captured: a first
#: chunk of 16, then chunks of 4, so that a solve needing a few sweeps more than 16 (or 32...)
#: runs at most 3 frozen sweeps past convergence instead of up to 15.
DEFAULT_CHUNKS = (16, 4)

Callback = Callable[[int, Tensor], None]


@dataclass(frozen=True)
class Stopping:
    """When and how a solve stops, validated once, here.

    Attributes:
        atol, rtol: a position is unchanged when |new - old| <= atol + rtol * |new|; 0 and 0
            mean bitwise equality (the exact certificate).
        max_iters: iteration budget; None: the method's exactness bound (T for jacobi, the
            number of blocks for jacobi_gs).
        check_every: read the convergence flag on the host every this many sweeps (the
            iteration count, value and traces stay those of stopping at convergence: the
            device step freezes once done), or a pair (first, then): a first chunk of
            `first` sweeps, then chunks of `then`. None: 1 eager, (16, 4) when captured.
        capture: "auto" records a chunk of sweeps (a direct method: its one sweep) in a CUDA
            graph and replays it when the state is on CUDA, the method's window is static and
            the problem declares its work capturable; True forces it (the caller vouches for
            the problem), False never captures. A captured loop is kept in `problem.graphs`
            and replayed by later solves with the same settings.
        record: keep residual and certified-prefix traces (turn off for timing).
        raise_on_failure: raise ConvergenceError instead of warning when max_iters is hit.
        rule: "elementwise" (every feature within atol + rtol |new|), or "variance" (the
            ParaDiGMS rule for samplers: the mean over a position's features of the squared
            change at most atol^2 times the noise variance of its step, from the problem's
            `noise_variance()`; rtol unused).

    Example:
        >>> ffsolve.solve(fn, x0, stopping=Stopping(atol=1e-6, record=False))
        >>> ffsolve.solve(fn, x0, atol=1e-6, record=False)      # the same
    """

    atol: float = 0.0
    rtol: float = 0.0
    max_iters: int | None = None
    check_every: int | tuple[int, int] | None = None
    capture: bool | str = "auto"
    record: bool = True
    raise_on_failure: bool = False
    rule: str = "elementwise"

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            # NaN would never certify a position, inf would certify every one
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        every = self.check_every
        if isinstance(every, tuple) and len(every) != 2:
            raise ValueError(f"check_every must be an int or a pair (first, then), got {every}")
        chunks = every if isinstance(every, tuple) else (every,)
        for name, value in [("max_iters", self.max_iters), *(("check_every", c) for c in chunks)]:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (self.capture == "auto" or self.capture is True or self.capture is False):
            raise ValueError(f"capture must be 'auto', True or False, got {self.capture!r}")
        for name in ("record", "raise_on_failure"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    @classmethod
    def of(cls, stopping: Stopping | None = None, **fields: Any) -> Stopping:
        """`stopping` (default: `Stopping()`) with `fields` replaced; an unknown field is a
        TypeError naming the valid ones."""
        if stopping is not None and not isinstance(stopping, Stopping):
            raise TypeError(f"stopping must be a Stopping, got {type(stopping).__name__}")
        unknown = sorted(set(fields) - FIELDS)
        if unknown:
            valid = ", ".join(sorted(FIELDS))
            raise TypeError(f"unknown stopping option(s) {', '.join(unknown)}; valid: {valid}")
        base = stopping if stopping is not None else cls()
        return dataclasses.replace(base, **fields) if fields else base

    @classmethod
    def merged(cls, stopping: Stopping | None = None, **fields: Any) -> Stopping:
        """`of`, for a user's call that gives both a `Stopping` and keyword fields: a field
        set in both to different values (the Stopping's not its default) is a TypeError
        naming it, never silently the keyword's."""
        if stopping is not None and isinstance(stopping, Stopping):
            both = sorted(
                k
                for k, v in fields.items()
                if k in FIELDS
                and getattr(stopping, k) != _DEFAULTS[k]
                and getattr(stopping, k) != v
            )
            if both:
                given = ", ".join(f"{k}={getattr(stopping, k)!r} vs {fields[k]!r}" for k in both)
                raise TypeError(
                    f"stopping option(s) given twice, in stopping= and as keywords ({given}): "
                    "give each once (stopping.replace(...) changes a field)"
                )
        return cls.of(stopping, **fields)

    @staticmethod
    def split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the stopping fields, the rest) of keyword options."""
        stop = {k: v for k, v in options.items() if k in FIELDS}
        return stop, {k: v for k, v in options.items() if k not in FIELDS}

    def replace(self, **fields: Any) -> Stopping:
        return Stopping.of(self, **fields)

    def forced_capture_only(self) -> Stopping:
        """This rule with capture="auto" turned off: for work rebuilt at every call (a
        backward's adjoint system), which "auto" would capture anew each time."""
        return self.replace(capture=False) if self.capture == "auto" else self

    def summary(self) -> dict[str, Any]:
        """The fields as a plain dict (check_every as a list), for records."""
        out = dataclasses.asdict(self)
        if isinstance(self.check_every, tuple):
            out["check_every"] = list(self.check_every)
        return out


FIELDS = frozenset(f.name for f in dataclasses.fields(Stopping))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Stopping)}


class State:
    """A contiguous iterate `x` and a (B, T, F) view `v` of it that aliases it.

    Leading dimensions of the problem's state are flattened into the batch B, the position
    dimension is T, trailing dimensions are the features F of a position.
    """

    def __init__(self, x: Tensor, dim: int, copy: bool = True) -> None:
        if x.numel() == 0:  # a view of zero elements cannot be reshaped to (B, T, F)
            raise ValueError(
                f"the initial iterate of shape {tuple(x.shape)} is empty (a zero-size batch or "
                "feature dimension): nothing to solve"
            )
        # copy=False: x itself (made contiguous), for a solve that never writes the state
        x = x.detach()
        self.x = x.clone(memory_format=torch.contiguous_format) if copy else x.contiguous()
        self.dim = dim
        self.shape = self.x.shape
        self.B, self.T, self.F = canonical_shape(self.shape, dim)
        self.v = self.x.view(self.B, self.T, self.F)  # (B, T, F), shares memory with x

    def flat(self, values: Tensor) -> Tensor:
        """A tensor shaped like the state with n positions -> (B, n, F)."""
        return values.reshape(self.B, -1, self.F)


class Method(Protocol):
    """What the loop asks of a method (`ffsolve.solvers.base.Solver` documents each hook and
    gives the defaults)."""

    name: ClassVar[str]
    capturable: ClassVar[bool]
    direct: ClassVar[bool]
    writes_state: ClassVar[bool]
    host_every_sweep: ClassVar[bool]
    residual_certificate: ClassVar[bool]
    nonfinite_hint: ClassVar[str]

    def validate(self, length: int, stopping: Stopping) -> None: ...
    def default_max_iters(self, length: int) -> int: ...
    def width(self, length: int) -> int: ...
    def window_start(self, certified: Any, length: int) -> Any: ...
    def init(self, problem: Problem, state: State) -> Any: ...
    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor: ...
    def guaranteed(self, certified: Tensor, length: int) -> Tensor: ...
    def evals_per_sweep(self, problem: Problem, start: int, stop: int) -> int: ...
    def finish(self, solution: Solution, memory: Any) -> Solution: ...
    def captures_with(self, problem: Problem) -> bool: ...
    def options(self) -> dict[str, Any]: ...


# --- the window a sweep updates -----------------------------------------------------------


class Window:
    """The positions [start, start + width) that one sweep updates.

    `start` is a Python int where the host knows it (the whole sequence, or a window placed
    by the host from the certified prefix it read), or a () long tensor on the state's device
    where the window moves on the device (the loop places it from the certificate inside the
    step, so chunks of sweeps are captured and the host reads nothing per sweep). Solvers and
    problems read and write the window's positions through it, the same code for both.

    Attributes:
        start: the first position (int, or () long tensor).
        width: n, the number of positions (fixed for a solve).
        length: T.
        frontier: () long tensor, the end of the furthest window swept before in this solve
            (positions >= frontier were never computed: `Problem.guess` may propose values).
    """

    def __init__(self, start: int | Tensor, width: int, length: int, frontier: Tensor) -> None:
        self.start, self.width, self.length, self.frontier = start, width, length, frontier
        self.moving = isinstance(start, Tensor)
        self._positions: Tensor | None = None

    @property
    def stop(self) -> int | Tensor:
        return self.start + self.width

    def bounds(self) -> tuple[int, int]:
        """(start, stop) as host ints; a window that moves on the device has none."""
        if self.moving:
            raise TypeError("this window moves on the device: its bounds are not host ints")
        return int(self.start), int(self.start) + self.width

    def positions(self) -> Tensor:
        """(n,) long: the positions, on the frontier's device."""
        if self._positions is None:
            arange = torch.arange(self.width, device=self.frontier.device)
            self._positions = arange + self.start
        return self._positions

    @property
    def index(self) -> slice | Tensor:
        """What indexes the positions along a dimension: a slice, or the positions tensor."""
        if self.moving:
            return self.positions()
        return slice(int(self.start), int(self.start) + self.width)

    def take(self, t: Tensor, dim: int = 1) -> Tensor:
        """`t` narrowed to the window along `dim` (a view for a host window, a copy else)."""
        if self.moving:
            return t.index_select(dim, self.positions())
        return t.narrow(dim, int(self.start), self.width)

    def put(self, t: Tensor, values: Tensor, dim: int = 1) -> Tensor:
        """A copy of `t` with the window's positions along `dim` replaced by `values`."""
        if not self.moving and self.width == t.shape[dim]:
            return values
        return t.index_copy(dim, self.positions(), values)

    def evaluate(self, problem: Problem, x: Tensor) -> Tensor:
        """f at the window's positions given the iterate x (shaped like x narrowed)."""
        if self.moving:
            return problem.evaluate_window(x, self.start, self.width)
        start, stop = self.bounds()
        return problem.evaluate(x, start, stop)


# --- capture: the one decision ------------------------------------------------------------


def captures(
    stopping: Stopping,
    device: torch.device,
    *,
    declared: bool = True,
    obstacles: list[str] | tuple[str, ...] = (),
    callback: Any = None,
) -> bool:
    """Whether work under `stopping` is captured in a CUDA graph (see `Stopping.capture`).

    Args:
        device: where the state lives (CUDA graphs need CUDA).
        declared: the problem declares the work capturable (what "auto" needs).
        obstacles: why the method itself cannot be captured (none: it can).
        callback: a per-sweep callback reads every iterate on the host (never captured).

    Raises:
        ValueError: capture=True where it is impossible, with the reasons.
    """
    if stopping.capture is False:
        return False
    reasons = list(obstacles)
    if not graphs.device_can_capture(device):
        reasons.insert(0, f"the state is on {device.type}, CUDA graphs need a CUDA device")
    if callback is not None:
        reasons.append("a callback reads every iterate on the host")
    if stopping.capture == "auto":
        return not reasons and declared
    if reasons:
        raise ValueError(f"capture=True is impossible here: {'; '.join(reasons)}")
    return True  # True: the caller vouches for the problem's work


def _obstacles(solver: Method) -> list[str]:
    if not solver.capturable:
        return [f"{solver.name}'s sweep does host-side work (not capturable)"]
    return []


# --- the host driver ----------------------------------------------------------------------


def run(solver: Method, problem: Problem, stopping: Stopping, callback: Callback | None = None):
    """Solve `problem` by `solver` under `stopping`: the one loop of every method.

    Iterate until every position of every batch item is certified, or `max_iters`; one host
    read per chunk of `check_every` sweeps (see the module docstring).
    """
    T = problem.length
    solver.validate(T, stopping)
    init = problem.initial()
    graph = captures(
        stopping,
        init.device,
        declared=solver.captures_with(problem),
        obstacles=_obstacles(solver),
        callback=callback,
    )
    problem.prepare()
    if solver.direct:
        return _run_direct(solver, problem, init, stopping, graph, callback)
    every = stopping.check_every or (DEFAULT_CHUNKS if graph else 1)
    first, then = every if isinstance(every, tuple) else (every, every)
    if solver.host_every_sweep:  # the method's memory must see only sweeps that count
        first = then = 1
    max_iters = stopping.max_iters or solver.default_max_iters(T)
    init_ok = torch.isfinite(init).all().long()  # read with the first chunk's flags
    width = solver.width(T)
    # a window narrower than T moves with the certified prefix: on the device where the loop
    # is captured or the problem gathers a window by a device offset, else placed by the host
    # from the certificate it reads after every sweep
    on_host = width < T and not (graph or problem.window_on_device)

    if graph:
        key = ("loop", solver, stopping, max_iters, (first, then),
               tuple(init.shape), init.dtype, init.device)  # fmt: skip
        loop = problem.graphs.get(key, lambda: _Loop(solver, problem, stopping, max_iters, init))
        loop.reset(init)
    else:
        loop = _Loop(solver, problem, stopping, max_iters, init)
    s = loop.state
    chunked = not on_host and callback is None  # else one sweep per host read
    k_host = 0  # the device count, as last read (exact: frozen steps do not count)
    sweeps = 0  # steps run, frozen ones included (model calls really made)
    num_evals = 0
    cert_min = 0
    while True:
        chunk = min(first if sweeps == 0 else then, max_iters) if chunked else 1
        start = solver.window_start(cert_min, T) if on_host else None
        loop.run(chunk, callback, sweeps, captured=graph, start=start)
        sweeps += chunk
        num_evals += chunk * loop.evals
        flags = torch.stack([loop.live.long(), loop.cert.min(), loop.k, init_ok])
        live, cert_min, k_host, first_ok = flags.tolist()  # the one host read of a chunk
        if not first_ok:
            raise NonFiniteError(f"{solver.name}: the initial iterate holds NaN or Inf")
        # frozen although uncertified with budget left: a non-finite iterate (k is its
        # number, it stays in the state); at the budget's end, look at the state once
        frozen = not live and cert_min < T
        if frozen and (k_host < max_iters or not bool(torch.isfinite(s.v).all())):
            raise_nonfinite(solver.name, s.v, k_host, hint=solver.nonfinite_hint)
        if cert_min >= T or k_host >= max_iters:
            break
    all_done = cert_min >= T
    per_item = torch.cat([loop.conv_iter(), loop.cert]).tolist()  # one more host read
    conv_iter, cert_final = per_item[: s.B], per_item[s.B :]
    num_iters = max(conv_iter) if all_done else k_host
    stats: dict[str, Any] = {
        "iters_per_item": [c if c >= 0 else k_host for c in conv_iter],
        "certified_final": cert_final,
        **solver.options(),
    }
    if max(first, then) > 1:
        stats["check_every"] = first if first == then else [first, then]
        stats["sweeps_run"] = sweeps
    if graph:
        stats["captured"] = loop.failure is None
        if loop.failure is not None:
            stats["capture_failed"] = loop.failure
    record = stopping.record
    res = loop.res_buf[:num_iters].clone() if record else None  # (num_iters, B)
    cer = loop.cer_buf[:num_iters].clone() if record else None
    value = s.x.clone() if graph else s.x  # graph buffers are reused by replays
    sol = Solution(value, loop.cert >= T, num_iters, num_evals, res, cer, stats)
    if not all_done:
        report_failure(solver.name, sol, max_iters, stopping.raise_on_failure)
    return solver.finish(sol, loop.memory)


def _at_most(t: Tensor, bound: int | Tensor) -> Tensor:
    """min(t, bound) for a host int or a device tensor bound (no host-to-device copy: the
    step may be captured)."""
    return torch.minimum(t, bound) if isinstance(bound, Tensor) else t.clamp(max=bound)


class _Loop:
    """The persistent buffers of one solve, its device step and how the step is replayed.

    Every tensor the step reads or writes lives here and is updated in place, so the same
    `step` runs eagerly or inside a CUDA graph: the iterate, the certificate, the counts, the
    traces, the window's frontier and the method's per-solve memory (a dict of tensors that
    the method's sweep replaces by new tensors, which the step commits under the `live` mask:
    a frozen sweep changes nothing, so counts and results do not depend on `check_every`).
    A captured loop is cached in `problem.graphs` and replayed by later solves with the same
    settings (buffers reset in place, graphs kept).
    """

    def __init__(
        self, solver: Method, problem: Problem, stopping: Stopping, max_iters: int, init: Tensor
    ) -> None:
        self.solver, self.problem = solver, problem
        self.atol, self.rtol = stopping.atol, stopping.rtol
        self.max_iters, self.record = max_iters, stopping.record
        self.exact = stopping.atol == 0 and stopping.rtol == 0
        self.variance = None  # (T,) the noise variance per position, for rule="variance"
        if stopping.rule == "variance":
            var = torch.as_tensor(problem.noise_variance(), dtype=init.dtype, device=init.device)
            if var.shape != (problem.length,) or not bool((var > 0).all()):
                raise ValueError(
                    f"rule='variance' needs noise_variance() of shape ({problem.length},) and "
                    f"> 0, got {tuple(var.shape)}"
                )
            self.variance = var * stopping.atol**2
            self.exact = False
        self.state = s = State(init, problem.dim)
        self.T = T = problem.length
        dev = s.x.device
        self.cert = torch.zeros(s.B, dtype=torch.long, device=dev)  # certified prefix per item
        # iterations after which an item was still uncertified: it converged at not_done + 1
        self.not_done = torch.zeros(s.B, dtype=torch.long, device=dev)
        self.k = torch.zeros((), dtype=torch.long, device=dev)  # iterations made (exact)
        self.live = torch.ones((), dtype=torch.bool, device=dev)  # the next step counts
        self.front = torch.zeros((), dtype=torch.long, device=dev)  # furthest window end
        # traces; row max_iters is a scratch row written by frozen steps
        n = max_iters + 1 if self.record else 0
        self.res_buf = torch.zeros(n, s.B, dtype=s.x.dtype, device=dev)  # (max_iters + 1, B)
        self.cer_buf = torch.zeros(n, s.B, dtype=torch.long, device=dev)
        self.width = min(solver.width(T), T)
        self.evals = solver.evals_per_sweep(problem, 0, self.width)
        self.memory = solver.init(problem, s)
        self.graphs: dict[int, Any] = {}  # captured chunks, by number of steps
        self.failure: str | None = None  # why capturing failed (then it runs eagerly)

    def reset(self, init: Tensor) -> None:
        """Back to the start of a solve, in place (captured steps read every buffer by
        address)."""
        self.state.x.copy_(init)
        for t in (self.cert, self.not_done, self.k, self.front):
            t.zero_()
        self.live.fill_(True)
        fresh = self.solver.init(self.problem, self.state)
        if isinstance(self.memory, dict):
            for name, buf in self.memory.items():
                buf.copy_(fresh[name])
        else:
            self.memory = fresh

    def conv_iter(self) -> Tensor:
        """(B,) the iteration at which each item became certified, -1 if it did not."""
        return torch.where(self.cert >= self.T, self.not_done + 1, -1)

    def window(self, start: int | None) -> Window:
        """The next sweep's window: every position, the host's start, or (a moving window
        without one) placed on the device from the certificate."""
        if self.width == self.T:
            start = 0
        elif start is None:
            start = self.solver.window_start(self.cert.min(), self.T)
        return Window(start, self.width, self.T, self.front)

    def step(self, start: int | None = None) -> None:
        """One iteration on the device: (state, certificate) -> (state, certificate).

        Static shapes, no host read, no Python branch on a tensor value, few kernels (each
        costs as much as a small model's layer). Once every item is certified, the budget is
        spent or a non-finite iterate appeared, `live` turns off and the step is frozen
        (state, certificate, count, memory and traces unchanged), so a chunk may run past the
        end and the result is exactly that of stopping right there. Certified positions are
        final: a window reaching back over them neither rewrites nor re-judges them.
        """
        solver, s, T, live, cert = self.solver, self.state, self.T, self.live, self.cert
        win = self.window(start)
        self.k.add_(live)  # the number of this iteration, if it counts
        # a window narrower than T (a window method) may reach back over certified positions
        # (near the end, or for items ahead of the batch's minimum): those are final, never
        # rewritten nor re-judged. The whole sequence needs no mask (a certified position of
        # an exact solve recomputes to itself), which keeps Jacobi's step as lean as before.
        narrow = win.width < T
        open_ = None
        if narrow:
            open_ = win.positions()[None, :] >= cert[:, None]  # (B, n): uncertified
            self._guess(win, open_)  # the problem may propose values for those
        memory = dict(self.memory) if isinstance(self.memory, dict) else self.memory
        out = solver.sweep(self.problem, s, win, memory)
        if solver.residual_certificate:  # (new values, G(x)): certify on G's residual
            new, fx = s.flat(out[0]), s.flat(out[1])  # (B, n, F) each
        else:
            new = fx = s.flat(out)  # (B, n, F): the new values are F(x) where it matters
        old = win.take(s.v)  # (B, n, F)
        if self.variance is not None:  # ParaDiGMS: mean squared change vs the step's noise
            err = (fx - old).square().mean(2)  # (B, n)
            same = err <= win.take(self.variance, 0)
        else:  # (B, n, F): bitwise equality (the exact certificate) or within the tolerances
            tol = None if self.exact else self.atol + self.rtol * fx.abs()
            same = fx == old if tol is None else (fx - old).abs() <= tol
            same = same[:, :, 0] if s.F == 1 else same.all(2)  # (B, n)
        if open_ is not None:
            same = same | ~open_  # certified positions are final
        prefix = same.cumprod(1, dtype=torch.long).sum(1)  # (B,) unchanged prefix of window
        # the first changed position is final too: its inputs are all certified
        reach = _at_most(prefix + (win.start + 1), win.stop)
        grown = torch.maximum(solver.guaranteed(cert, T), reach)
        if win.moving or win.start != 0:  # only where the window's inputs are certified
            grown = torch.where(cert >= win.start, grown, cert)
        # NaN/Inf: the step freezes on the first non-finite iterate, which stays in the state
        # (the driver finds it there with one reduction per chunk). amax propagates NaN, and
        # |x| < inf is false for NaN and Inf: cheaper than isfinite(x).all() (4-5 kernels).
        if solver.residual_certificate:  # certified positions take G(x): final values
            pos = win.positions()  # (n,)
            new = torch.where(pos[None, :, None] < grown[:, None, None], fx, new)
        if self.record:
            res = (fx - old).abs().amax(dim=(1, 2))  # (B,) residual trace
            row = torch.where(live, self.k - 1, self.max_iters).reshape(1)  # (1,)
            self.res_buf.index_copy_(0, row, res[None].to(self.res_buf.dtype))
            self.cer_buf.index_copy_(0, row, torch.where(live, grown, cert)[None])
            finite = res.amax() < math.inf  # a non-finite new value makes its change so
            if solver.residual_certificate:
                finite = finite & (new.abs().amax() < math.inf)
        else:
            finite = new.abs().amax() < math.inf
        self._commit(memory)
        write = live if open_ is None else live & open_[:, :, None]  # (), or (B, n, 1)
        if win.moving:
            s.v.index_copy_(1, win.positions(), torch.where(write, new, old))
        elif new.requires_grad:  # the state takes the new values if live
            old.copy_(torch.where(write, new, old))
        else:
            torch.where(write, new, old, out=old)  # elementwise in place, one kernel
        settled = self.problem.settled(s.x, grown)  # final without a sweep (after an EOS)
        if settled is not None:
            grown = torch.maximum(grown, settled)
            if self.record:
                self.cer_buf.index_copy_(0, row, torch.where(live, grown, cert)[None])
        torch.where(live, grown, cert, out=cert)
        if narrow:  # the end of the furthest window swept (what `guess` reads)
            torch.where(live, -_at_most(-self.front, -win.stop), self.front, out=self.front)
        # an item certified at iteration j was uncertified after exactly j - 1 iterations
        # (all live: nothing freezes before every item is certified or the budget is spent)
        self.not_done.add_(cert < T)
        live.logical_and_(cert.min() < T).logical_and_(self.k < self.max_iters)
        live.logical_and_(finite)

    def _guess(self, win: Window, open_: Tensor) -> None:
        """The problem's proposals for the window's uncertified positions, written into the
        state before a live sweep (the certificate does not depend on starting values, so any
        proposal keeps the result exact; a good one saves sweeps)."""
        s = self.state
        values = self.problem.guess(s.x, win, self.cert)
        if values is None:
            return
        values = s.flat(values)  # (B, n, F)
        if values.shape[1] != win.width:
            raise ValueError(f"guess() gave {values.shape[1]} positions for a window of "
                             f"{win.width}")  # fmt: skip
        cur = win.take(s.v)
        upd = torch.where(self.live & open_[:, :, None], values.to(cur), cur)
        if win.moving:
            s.v.index_copy_(1, win.positions(), upd)
        else:
            cur.copy_(upd)

    def _commit(self, memory: Any) -> None:
        """The method's new memory into the loop's buffers, where the sweep counts (a method
        that sees every sweep on the host keeps whatever it returned)."""
        if not isinstance(memory, dict):
            return
        for name, new in memory.items():
            buf = self.memory[name]
            if new is buf:
                continue
            if self.solver.host_every_sweep:
                self.memory[name] = new
            else:
                torch.where(self.live, new, buf, out=buf)

    def run(
        self, n: int, callback: Callback | None, base: int, captured: bool, start: int | None
    ) -> None:
        """`n` steps: eagerly, or one replay of a captured chunk (captured at first use; a
        capture that fails warns once, and the loop runs eagerly from then on)."""
        if not captured or self.failure is not None:
            for i in range(n):
                self.step(start)
                if callback is not None:
                    callback(base + i + 1, self.state.x)
            return
        if n in self.graphs:
            self.graphs[n].replay()
            return
        with torch.no_grad():  # the warm-up runs the chunk's n steps for real
            graph, self.failure = graphs.try_capture(lambda: self.step(), n,
                                                     f"{self.solver.name}'s loop")  # fmt: skip
        if graph is not None:
            self.graphs[n] = graph


# --- direct methods: the loop with one step -----------------------------------------------


class _Direct:
    """One sweep of a direct method over every position, on buffers that a CUDA graph can
    capture: the start, the state (a copy of the start when the method writes it), the
    method's memory, and after the sweep its value and one norm (the residual trace, or the
    value's max-abs) that is NaN or Inf exactly where the value is."""

    def __init__(self, solver: Method, problem: Problem, init: Tensor, record: bool, static: bool):
        self.solver, self.problem, self.record = solver, problem, record
        self.start = (
            init.detach().clone(memory_format=torch.contiguous_format)
            if static
            else (init.detach())
        )
        self.state = State(self.start, problem.dim, copy=solver.writes_state)
        self.restart = static and solver.writes_state  # a replay starts from `start` again
        self.memory = solver.init(problem, self.state)
        self.value: Tensor | None = None
        self.norm: Tensor | None = None
        self.graph: Any = None
        self.failure: str | None = None  # why capturing failed (then it runs eagerly)
        zero = torch.zeros((), dtype=torch.long, device=self.start.device)
        self.window = Window(0, self.state.T, self.state.T, zero)

    def body(self) -> None:
        s = self.state
        if self.restart:
            s.x.copy_(self.start)
        new = s.flat(self.solver.sweep(self.problem, s, self.window, self.memory))  # (B, T, F)
        # a max-abs norm is NaN or Inf where the values are: it doubles as the NaN/Inf flag
        # (few kernels: launches are what a small direct solve costs)
        if self.record:
            start = self.start.reshape(new.shape)
            self.norm = torch.linalg.vector_norm(new - start, ord=math.inf, dim=(1, 2))  # (B,)
        else:
            self.norm = torch.linalg.vector_norm(new, ord=math.inf).reshape(1)
        self.value = new

    def run(self, captured: bool) -> None:
        if not captured or self.failure is not None:
            self.body()
        elif self.graph is None:  # the warm-up is this solve's sweep
            with torch.no_grad():
                what = f"{self.solver.name}'s sweep"
                self.graph, self.failure = graphs.try_capture(self.body, 1, what)
        else:
            self.graph.replay()


def _run_direct(
    solver: Method,
    problem: Problem,
    init: Tensor,
    stopping: Stopping,
    graph: bool,
    callback: Callback | None,
) -> Solution:
    """A direct method's solve: one sweep over every position, one host read (NaN/Inf)."""
    record = stopping.record
    if graph:
        key = ("direct", solver, record, tuple(init.shape), init.dtype, init.device)
        prog = problem.graphs.get(key, lambda: _Direct(solver, problem, init, record, True))
        prog.start.copy_(init)
    else:
        prog = _Direct(solver, problem, init, record, False)
    prog.run(graph)
    new, norm = prog.value, prog.norm
    assert new is not None and norm is not None  # set by the sweep
    flags = norm.tolist()  # the one host read
    if not all(math.isfinite(v) for v in flags):
        raise_nonfinite(solver.name, new, 1, hint=solver.nonfinite_hint)
    s = prog.state
    value = new.reshape(s.shape)
    if graph:
        value = value.clone()  # the graph's buffers are reused by the next replay
    if callback is not None:
        callback(1, value)
    B, T, dev = s.B, s.T, s.x.device
    stats: dict[str, Any] = {"iters_per_item": [1] * B, "certified_final": [T] * B}
    stats.update(solver.options())
    if graph:
        stats["captured"] = prog.failure is None
        if prog.failure is not None:
            stats["capture_failed"] = prog.failure
    sol = Solution(
        value,
        torch.ones(B, dtype=torch.bool, device=dev),
        1,
        solver.evals_per_sweep(problem, 0, T),
        norm[None] if record else None,  # (1, B): the change from the start
        torch.full((1, B), T, dtype=torch.long, device=dev) if record else None,
        stats,
    )
    return solver.finish(sol, prog.memory)


def direct_value(solver: Method, problem: Problem) -> Tensor:
    """A direct method's solution with no check and no host read (what a CUDA graph can
    capture; `run` is the checked path): the one sweep's value, shaped like the state. The
    caller owns the NaN/Inf check."""
    if not solver.direct:
        raise TypeError(f"{solver.name} is not a direct method (it iterates): use solve()")
    solver.validate(problem.length, Stopping())
    problem.prepare()
    init = problem.initial()
    state = State(init, problem.dim, copy=solver.writes_state)
    memory = solver.init(problem, state)
    window = Window(0, state.T, state.T, torch.zeros((), dtype=torch.long, device=init.device))
    return solver.sweep(problem, state, window, memory).reshape(state.shape)
