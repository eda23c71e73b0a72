"""The one iteration loop, the Solution record and the solver base class.

Every parallel solver is a small frozen object that says which window of positions one
iteration updates (`region`) and how it computes the new values there (`sweep`). The loop
does the rest, identically for every method: compare the new values with the old, track the
certified prefix, record traces, stop online, detect NaN/Inf. It is split in two:

- the device step (`_Loop.step`): (state, certificate) -> (state, certificate), in place on
  persistent buffers, with static shapes, no host read and no Python branch on a tensor
  value, so that a chunk of steps can be captured in a CUDA graph and replayed;
- the host driver (`Solver.solve`): runs the step `check_every` times per chunk (eagerly, or
  as one graph replay), reads one small tensor per chunk, raises on NaN/Inf, and turns the
  certificate into a `Solution`. The step freezes itself once done, so the iteration count,
  value and traces are those of stopping exactly at convergence, whatever the chunk.

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
from collections import OrderedDict
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

    #: the sweep has static shapes and no host-side work (its chunks may be captured)
    capturable: ClassVar[bool] = True

    #: one sweep of the whole sequence IS the solution (a direct method, e.g. `scan`): the
    #: loop runs it once and certifies every position without comparing iterates (on a GPU
    #: the iteration bookkeeping would cost more kernels than a small direct solve)
    direct: ClassVar[bool] = False

    def static_region(self) -> bool:
        """True when `region` ignores the certified prefix (no host read needed per sweep)."""
        return True

    def default_max_iters(self, length: int) -> int:
        return length

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _raise_nonfinite(self, state: _Canonical, iteration: int, current: int) -> None:
        self._raise_nonfinite_in(state.v, iteration, current)

    def _raise_nonfinite_in(self, v: Tensor, iteration: int, current: int) -> None:
        pos = _first_nonfinite(v)
        where = f"position {pos}" if pos is not None else "a position no longer non-finite"
        if iteration != current:
            where += f" (located in the iterate of iteration {current})"
        raise NonFiniteError(
            f"{self.name}: NaN or Inf in the iterate at iteration {iteration}, {where}"
        )

    # --- the one loop: a device step and a host driver ------------------------------------
    def solve(
        self,
        problem: Problem,
        *,
        atol: float = 0.0,
        rtol: float = 0.0,
        max_iters: int | None = None,
        record: bool = True,
        check_every: int | tuple[int, int] | None = None,
        raise_on_failure: bool = False,
        callback: Callable[[int, Tensor], None] | None = None,
        capture: bool | str = "auto",
    ) -> Solution:
        """Iterate until every position of every batch item is certified, or `max_iters`.

        The work is split in two (STYLE.md, "One loop, also when it is captured"): a device
        step (`_Loop.step`: sweep, compare, certify, count, trace, NaN flag; static shapes, no
        host read, no Python branch on a tensor value) and this host driver, which runs the
        step `check_every` times per chunk, eagerly or as one replay of a CUDA graph, then
        reads one small tensor (NaN flag, certified minimum, iteration count).
        """
        T = problem.length
        self.validate(T)
        init = problem.initial()
        mode = _capture_mode(capture, self, problem, init.device, callback)
        if check_every is None:
            check_every = DEFAULT_CHUNKS if mode == "graph" else 1
        check_stopping(atol, rtol, max_iters, check_every)
        first, then = _chunks(check_every)
        if max_iters is None:
            max_iters = self.default_max_iters(T)
        if self.direct:
            return self._solve_direct(problem, init, record, callback)
        init_ok = torch.isfinite(init).all().long()  # read with the first chunk's flags
        problem.prepare()

        loop = _Loop.build(self, problem, init, atol, rtol, max_iters, record, mode, check_every)
        s = loop.state
        static = self.static_region()
        chunked = static and callback is None  # else one sweep per host read
        k_host = 0  # the device count, as last read (exact: frozen steps do not count)
        sweeps = 0  # steps run, frozen ones included (model calls really made)
        num_evals = 0
        while True:
            if static:
                chunk = min(first if sweeps == 0 else then, max_iters) if chunked else 1
                loop.run(chunk, callback, sweeps)
                sweeps += chunk
                num_evals += chunk * loop.evals
            else:
                start, stop = self.region(loop.cert_min, T)
                loop.step(start, stop)
                sweeps += 1
                num_evals += self.evals_per_sweep(problem, start, stop)
                if callback is not None:
                    callback(sweeps, s.x)
            flags = torch.stack([loop.live.long(), loop.cert.min(), loop.k, init_ok])
            live, cert_min, k_host, first_ok = flags.tolist()  # the one host read of a chunk
            if not first_ok:
                raise NonFiniteError(f"{self.name}: the initial iterate holds NaN or Inf")
            loop.cert_min = cert_min
            # frozen although uncertified with budget left: a non-finite iterate (k is its
            # number, it stays in the state); at the budget's end, look at the state once
            frozen = not live and cert_min < T
            if frozen and (k_host < max_iters or not bool(torch.isfinite(s.v).all())):
                self._raise_nonfinite(s, k_host, k_host)
            if cert_min >= T or k_host >= max_iters:
                break
        all_done = cert_min >= T
        converged = loop.cert >= T  # (B,)
        per_item = torch.cat([loop.conv_iter(), loop.cert]).tolist()  # one more host read
        conv_iter, cert_final = per_item[: s.B], per_item[s.B :]
        num_iters = max(conv_iter) if all_done else k_host
        stats: dict[str, Any] = {
            "iters_per_item": [c if c >= 0 else k_host for c in conv_iter],
            "certified_final": cert_final,
            **self.options(),
        }
        if max(first, then) > 1:
            stats["check_every"] = check_every if first == then else [first, then]
            stats["sweeps_run"] = sweeps
        if mode == "graph":
            stats["captured"] = True
        res = loop.res_buf[:num_iters].clone() if record else None  # (num_iters, B)
        cer = loop.cer_buf[:num_iters].clone() if record else None
        value = s.x.clone() if mode == "graph" else s.x  # graph buffers are reused by replays
        sol = Solution(value, converged, num_iters, num_evals, res, cer, stats)
        if not all_done:
            _report_failure(self.name, sol, max_iters, raise_on_failure)
        return sol

    def direct_value(self, problem: Problem) -> Tensor:
        """A direct method's solution with no check and no host read (what a CUDA graph can
        capture; `solve` is the checked path): the one sweep's value, shaped like the state.
        The caller owns the NaN/Inf check."""
        if not self.direct:
            raise TypeError(f"{self.name} is not a direct method (it iterates): use solve()")
        self.validate(problem.length)
        s = _Canonical(problem.initial(), problem.dim, copy=False)
        return self._direct_sweep(problem, s).reshape(s.shape)

    def _direct_sweep(self, problem: Problem, s: _Canonical) -> Tensor:
        problem.prepare()
        return self.sweep(problem, s, 0, s.T)

    def _solve_direct(
        self,
        problem: Problem,
        init: Tensor,
        record: bool,
        callback: Callable[[int, Tensor], None] | None,
    ) -> Solution:
        """A direct method's solve: one sweep over every position, one host read (NaN/Inf)."""
        s = _Canonical(init, problem.dim, copy=False)  # a sweep never writes the state
        new = s.flat(self._direct_sweep(problem, s))  # (B, T, F)
        # the residual trace is the change from the start; a max-abs norm is NaN or Inf where
        # the values are, so it doubles as the NaN/Inf flag (few kernels: launches cost here)
        inf = math.inf
        res = torch.linalg.vector_norm(new - s.v, ord=inf, dim=(1, 2)) if record else None
        flag = res.tolist() if res is not None else [float(torch.linalg.vector_norm(new, inf))]
        if not all(math.isfinite(v) for v in flag):  # the one host read
            self._raise_nonfinite_in(new, 1, 1)
        value = new.reshape(s.shape)
        if callback is not None:
            callback(1, value)
        B, dev = s.B, s.x.device
        stats = {"iters_per_item": [1] * B, "certified_final": [s.T] * B, **self.options()}
        return Solution(
            value,
            torch.ones(B, dtype=torch.bool, device=dev),
            1,
            self.evals_per_sweep(problem, 0, s.T),
            None if res is None else res[None],  # (1, B)
            torch.full((1, B), s.T, dtype=torch.long, device=dev) if record else None,
            stats,
        )


#: Sweeps per host read (and per CUDA-graph replay) when the loop is captured: a first
#: chunk of 16, then chunks of 4, so that a solve needing a few sweeps more than 16 (or 32...)
#: runs at most 3 frozen sweeps past convergence instead of up to 15.
DEFAULT_CHUNKS = (16, 4)


def _chunks(check_every: int | tuple[int, int]) -> tuple[int, int]:
    """(first chunk, later chunks) of a validated `check_every`."""
    if isinstance(check_every, tuple):
        return check_every
    return check_every, check_every


def _capture_mode(
    capture: bool | str, solver: Solver, problem: Problem, device: torch.device, callback: Any
) -> str:
    """'graph' or 'eager' for `capture` = "auto" | True | False (see `ffsolve.solve`)."""
    reasons = []
    if not solver.capturable:
        reasons.append(f"{solver.name}'s sweep does host-side work (not capturable)")
    if not solver.static_region():
        reasons.append(f"{solver.name}'s window moves with the certified prefix (a host read)")
    return _choose_mode(capture, device, callback, problem.capturable, reasons)


def _choose_mode(
    capture: bool | str, device: torch.device, callback: Any, declared: bool, reasons: list[str]
) -> str:
    """'graph' or 'eager': the checks every captured loop shares (CUDA, no callback).

    Args:
        declared: the problem declares the captured work capturable (needed by "auto").
        reasons: why the method itself cannot be captured (empty: it can).
    """
    if capture not in ("auto", True, False):
        raise ValueError(f"capture must be 'auto', True or False, got {capture!r}")
    if capture is False:
        return "eager"
    if device.type != "cuda":
        reasons = [f"the state is on {device.type}, CUDA graphs need a CUDA device", *reasons]
    if callback is not None:
        reasons = [*reasons, "a callback reads every iterate on the host"]
    if capture == "auto":
        return "graph" if not reasons and declared else "eager"
    if reasons:
        raise ValueError(f"capture=True is impossible here: {'; '.join(reasons)}")
    return "graph"  # True: the caller vouches for the problem's sweep


def _canon(init: Tensor, problem: Problem) -> _Canonical:
    return _Canonical(init, problem.dim)


class _Loop:
    """The persistent buffers of one solve, its device step and how the step is replayed.

    Every tensor the step reads or writes lives here and is updated in place, so the same
    `step` runs eagerly or inside a CUDA graph. A captured loop is cached on the problem and
    replayed by later solves with the same settings (buffers reset, graph kept).
    """

    def __init__(self, solver, problem, atol, rtol, max_iters, record, state) -> None:
        self.solver, self.problem = solver, problem
        self.atol, self.rtol, self.max_iters, self.record = atol, rtol, max_iters, record
        self.exact = atol == 0 and rtol == 0
        self.state = s = state
        self.T = problem.length
        dev = s.x.device
        self.cert = torch.zeros(s.B, dtype=torch.long, device=dev)  # certified prefix per item
        # iterations after which an item was still uncertified: it converged at not_done + 1
        self.not_done = torch.zeros(s.B, dtype=torch.long, device=dev)
        self.k = torch.zeros((), dtype=torch.long, device=dev)  # iterations made (exact)
        self.live = torch.ones((), dtype=torch.bool, device=dev)  # the next step counts
        # traces; row max_iters is a scratch row written by frozen steps
        n = max_iters + 1 if record else 0
        self.res_buf = torch.zeros(n, s.B, dtype=s.x.dtype, device=dev)  # (max_iters + 1, B)
        self.cer_buf = torch.zeros(n, s.B, dtype=torch.long, device=dev)
        self.start, self.stop = solver.region(0, self.T)
        self.evals = solver.evals_per_sweep(problem, self.start, self.stop)
        self.cert_min = 0
        self.mode = "eager"
        self.graphs: dict[int, Any] = {}  # captured chunks, by number of steps

    @classmethod
    def build(cls, solver, problem, init, atol, rtol, max_iters, record, mode, check_every):
        """A fresh loop, or in graph mode the cached one of the same settings, reset."""
        if mode == "graph":
            key = (solver, float(atol), float(rtol), max_iters, record, check_every)
            cache = problem.__dict__.setdefault("_ffsolve_graphs", {})
            loop = cache.get(key)
            if loop is None:
                loop = cls(solver, problem, atol, rtol, max_iters, record, _canon(init, problem))
                loop.mode = "graph"
                cache[key] = loop
            else:
                loop.reset(init)
            return loop
        return cls(solver, problem, atol, rtol, max_iters, record, _canon(init, problem))

    def reset(self, init: Tensor) -> None:
        self.state.x.copy_(init)
        self.cert.zero_()
        self.not_done.zero_()
        self.k.zero_()
        self.live.fill_(True)
        self.cert_min = 0

    def conv_iter(self) -> Tensor:
        """(B,) the iteration at which each item became certified, -1 if it did not."""
        return torch.where(self.cert >= self.T, self.not_done + 1, -1)

    def step(self, start: int, stop: int) -> None:
        """One iteration on the device: (state, certificate) -> (state, certificate).

        Static shapes, no host read, no Python branch on a tensor value, few kernels (each
        costs as much as a small model's layer). Once every item is certified, the budget is
        spent or a non-finite iterate appeared, `live` turns off and the step is frozen
        (state, certificate, count and traces unchanged), so a chunk may run past the end
        and the result is exactly that of stopping right there.
        """
        solver, s, T, live, cert = self.solver, self.state, self.T, self.live, self.cert
        self.k.add_(live)  # the number of this iteration, if it counts
        new = s.flat(solver.sweep(self.problem, s, start, stop))  # (B, n, F)
        old = s.v[:, start:stop]  # (B, n, F)
        # (B, n, F): bitwise equality (the exact certificate) or within the tolerances
        tol = None if self.exact else self.atol + self.rtol * new.abs()
        same = new == old if tol is None else (new - old).abs() <= tol
        same = same[:, :, 0] if s.F == 1 else same.all(2)  # (B, n)
        prefix = same.cumprod(1, dtype=torch.long).sum(1)  # (B,) unchanged prefix of window
        # the first changed position is final too: its inputs are all certified
        reach = (prefix + (start + 1)).clamp_(max=stop)
        grown = torch.maximum(solver.guaranteed(cert, T), reach)
        if start != 0:  # only where the window's inputs are certified
            grown = torch.where(cert >= start, grown, cert)
        # NaN/Inf: the step freezes on the first non-finite iterate, which stays in the state
        # (the driver finds it there with one reduction per chunk). amax propagates NaN, and
        # |x| < inf is false for NaN and Inf: cheaper than isfinite(x).all() (4-5 kernels).
        if self.record:
            res = (new - old).abs().amax(dim=(1, 2))  # (B,) residual trace
            row = torch.where(live, self.k - 1, self.max_iters).reshape(1)  # (1,)
            self.res_buf.index_copy_(0, row, res[None].to(self.res_buf.dtype))
            self.cer_buf.index_copy_(0, row, torch.where(live, grown, cert)[None])
            finite = res.amax() < math.inf  # a non-finite new value makes its change so
        else:
            finite = new.abs().amax() < math.inf
        if new.requires_grad:  # the state takes the new values if live
            old.copy_(torch.where(live, new, old))
        else:
            torch.where(live, new, old, out=old)  # elementwise in place, one kernel
        torch.where(live, grown, cert, out=cert)
        # an item certified at iteration j was uncertified after exactly j - 1 iterations
        # (all live: nothing freezes before every item is certified or the budget is spent)
        self.not_done.add_(cert < T)
        live.logical_and_(cert.min() < T).logical_and_(self.k < self.max_iters)
        live.logical_and_(finite)

    def run(self, n: int, callback: Any, base: int) -> None:
        """`n` steps of the static region: eagerly, or one replay of a captured chunk."""
        if self.mode == "eager":
            for i in range(n):
                self.step(self.start, self.stop)
                if callback is not None:
                    callback(base + i + 1, self.state.x)
            return
        with torch.no_grad():
            if n not in self.graphs:
                self.graphs[n] = _capture(lambda: self.step(self.start, self.stop), n)
            else:
                self.graphs[n].replay()


class GraphCache:
    """Captured CUDA graphs (with their buffers) by key, the least recently used dropped once
    more than `size` are kept: what a cached graph holds stays on the device until then."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The entry of `key`, made now by `make()` at first use."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def values(self) -> list[Any]:
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def _capture(body: Callable[[], None], n: int) -> Any:
    """Run `body` n times for real on a side stream (warm-up: cuBLAS handles, allocator),
    then capture n calls of it in a CUDA graph and return the graph (not yet replayed: the
    warm-up already did this chunk's work)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            body()
    return graph


def check_stopping(
    atol: float,
    rtol: float,
    max_iters: int | None,
    check_every: int | tuple[int, int] | None,
) -> None:
    """Validate the stopping options shared by every solve (and by callers that defer one).

    atol and rtol must be finite numbers >= 0 (NaN would never certify a position, inf would
    certify every one); max_iters an int >= 1 and check_every an int >= 1 or a pair of them
    (first chunk, later chunks), or None: their defaults.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    chunks = check_every if isinstance(check_every, tuple) else (check_every,)
    if isinstance(check_every, tuple) and len(check_every) != 2:
        raise ValueError(f"check_every must be an int or a pair (first, then), got {check_every}")
    for name, value in [("max_iters", max_iters), *(("check_every", c) for c in chunks)]:
        if value is None:  # max_iters: the method's bound; check_every: the mode's default
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
