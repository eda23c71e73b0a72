"""The ordinary sequential loop (Gauss-Seidel in natural order): the reference and baseline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem, canonical_shape
from ffsolve.solvers.base import (
    NonFiniteError,
    Solution,
    Solver,
    _Canonical,
    _capture,
    _choose_mode,
    check_stopping,
)

__all__ = ["Sequential"]


@dataclass(frozen=True)
class Sequential(Solver):
    """x_t = f_t(x_<t) for t = 0, 1, ..., T-1, one position per step.

    Uses the problem's `stepper`, so a model with a cache or an incremental update (the
    strongest sequential baseline) is used when the problem offers one.

    Example:
        >>> sol = ffsolve.solve(fn, x0, method="sequential")
        >>> sol.num_iters == x0.shape[1]
    """

    name: ClassVar[str] = "sequential"

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
        T = problem.length
        check_stopping(atol, rtol, max_iters, check_every)  # same options as every method
        if max_iters is not None and max_iters < T:
            raise ValueError(f"sequential needs exactly T={T} steps; max_iters={max_iters}")
        init = problem.initial()
        mode = _sequential_mode(capture, problem, init.device, callback)
        problem.prepare()
        if mode == "graph":
            x = _captured_program(problem, init).run()
        else:
            s = _Canonical(init, problem.dim)
            step = problem.stepper(s.x)
            for t in range(T):
                s.v[:, t : t + 1] = s.flat(step(t))
                if callback is not None:
                    callback(t + 1, s.x)
            x = s.x
        v = x.view(canonical_shape(x.shape, problem.dim))  # (B, T, F)
        if not bool(torch.isfinite(v).all()):  # one host read, after the loop
            bad = (~torch.isfinite(v)).any(2).any(0).int().argmax()
            raise NonFiniteError(f"sequential: NaN or Inf in the result at position {int(bad)}")
        B = v.shape[0]
        converged = torch.ones(B, dtype=torch.bool, device=x.device)
        cert = None
        if record:
            steps = torch.arange(1, T + 1, device=x.device)
            cert = steps[:, None].expand(T, B).clone()  # (T, B)
        stats = {"captured": True} if mode == "graph" else {}
        return Solution(x, converged, T, T * problem.num_evals_per_step, None, cert, stats)


def _sequential_mode(capture: bool | str, problem: Problem, device: torch.device, callback) -> str:
    """'graph' when the whole loop may be captured (the problem's stepper says so)."""
    return _choose_mode(capture, device, callback, problem.capturable_stepper, [])


class _SequentialProgram:
    """The whole sequential loop (t = 0..T-1) captured in one CUDA graph, cached on the
    problem. Inputs: the start buffer; output: the state buffer (cloned per solve)."""

    def __init__(self, problem: Problem, init: Tensor) -> None:
        self.problem = problem
        self.start = init.detach().clone(memory_format=torch.contiguous_format)
        self.state = _Canonical(init, problem.dim)
        self.step = problem.stepper(self.state.x)  # host work (if any) happens here, once
        self.graph = None

    def body(self) -> None:
        s = self.state
        s.x.copy_(self.start)  # the stepper restarts at step 0 from these contents
        for t in range(self.problem.length):
            s.v[:, t : t + 1] = s.flat(self.step(t))

    def run(self) -> Tensor:
        with torch.no_grad():
            if self.graph is None:
                self.graph = _capture(self.body, 1)
            else:
                self.graph.replay()
        return self.state.x.clone()


def _captured_program(problem: Problem, init: Tensor) -> _SequentialProgram:
    cache = problem.__dict__.setdefault("_ffsolve_graphs", {})
    prog = cache.get("sequential")
    if prog is None or prog.start.shape != init.shape:
        prog = cache["sequential"] = _SequentialProgram(problem, init)
    else:
        prog.start.copy_(init)
    return prog
