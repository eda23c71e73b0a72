"""`backprop_through`: back-propagation through a recurrence with the adjoint system of BPTT
solved by any core method (see `ffsolve.problems.recurrence` for the system).

The forward pass is the ordinary sequential loop; `.backward()` builds a `RecurrenceAdjoint`
problem, solves it with the chosen solver and accumulates the gradients into the cell's
parameters, h_0 and xs exactly like autograd would.

With a direct method (`scan`) on CUDA, `capture` (in the backward's `Stopping`) replays the
backward up to the adjoints (adjoint problem, Jacobians, scan) from one CUDA graph captured at
the first backward of a shape and cached, and runs the input gradients (the cell's forward on
every step and its backward) eagerly: a short sequence's backward is a few dozen small kernels
whose launches, not their work, are its cost.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ffsolve import graphs
from ffsolve.problems.recurrence import RecurrenceAdjoint, RecurrenceForward, torch_cell_jacobian
from ffsolve.problems.recurrence import StateLayout as _Layout
from ffsolve.solvers import NonFiniteError, Solution, Solver, Stopping, get_solver
from ffsolve.solvers.loop import captures, direct_value
from ffsolve.solvers.record import raise_nonfinite

__all__ = ["BackpropInfo", "backprop_through", "clear_graphed_backwards"]

#: A recurrent state: one tensor (B, *shape) or a tuple of them (e.g. an LSTM's (h, c)).
State = Tensor | tuple[Tensor, ...]


@dataclass
class BackpropInfo:
    """What `backprop_through` did; filled in when backward runs (None before).

    Attributes:
        method: the solver's name.
        options: solver options and stopping settings.
        length: T, the number of time steps.
        batch: B.
        solution: the last backward's `Solution` of the adjoint system (reversed time).
        backward_calls: how many times backward ran on this graph.
    """

    method: str
    options: dict[str, Any]
    length: int
    batch: int
    solution: Solution | None = None
    backward_calls: int = 0
    forward_solution: Solution | None = None  # the last parallel forward's (forward_method)

    @property
    def num_iters(self) -> int | None:
        """Parallel iterations of the last solve (T for sequential), or None before backward."""
        return None if self.solution is None else self.solution.num_iters

    @property
    def converged(self) -> bool | None:
        """Whether every batch item's adjoints were certified (False: a truncated budget)."""
        return None if self.solution is None else self.solution.all_converged

    @property
    def residuals(self) -> list[float] | None:
        """Max-abs change of the adjoints per iteration (max over the batch), or None when
        not recorded (`record=False`, or the sequential method)."""
        if self.solution is None or self.solution.residuals is None:
            return None
        return self.solution.residuals.double().amax(1).tolist()

    @property
    def final_residual(self) -> float | None:
        """The last iteration's max-abs change of the adjoints (None when not recorded)."""
        res = self.residuals
        return res[-1] if res else None

    @property
    def adjoints(self) -> Tensor | None:
        """dL/dh_t for t = 1..T in time order, (B, T, F) with the state's features flattened
        (an LSTM's h then c), or None before backward."""
        return None if self.solution is None else self.solution.value.flip(1)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary for logs."""
        return {
            "method": self.method,
            "num_iters": self.num_iters,
            "converged": self.converged,
            "final_residual": self.final_residual,
            "backward_calls": self.backward_calls,
        }


class _Plan:
    """Everything the autograd function needs besides tensors."""

    def __init__(
        self,
        cell: Callable[[State, Tensor], State],
        layout: _Layout,
        solver: Solver,
        backward: Stopping,
        info: BackpropInfo,
    ) -> None:
        self.user_cell = cell
        self.layout = layout
        self.solver = solver
        self.backward = backward  # the adjoint solve's stopping rule
        self.info = info
        self.keep_chain = solver.name == "sequential"
        self.jacobian: Callable[[Tensor, Tensor, bool], Tensor] | None = None  # closed form
        self.forward: tuple[Solver, Stopping] | None = None  # a parallel forward
        self.structure: Any = None  # the cell as given (its structure may give a fast VJP)
        self.fast = True
        self.jacobian_given: Any = None  # the caller's `jacobian` (part of a graph's key)
        self.captured = False  # a direct method's whole backward replayed from a CUDA graph

    def cell(self, h: Tensor, x: Tensor) -> Tensor:
        """The cell on flat states: (N, F), (N, *D) -> (N, F)."""
        if self.layout.plain:  # one (N, F) state: no reshaping, one cheap check per call
            out = self.user_cell(h, x)
            if isinstance(out, Tensor) and out.shape == h.shape and out.dtype == h.dtype:
                return out
            self.layout.parts_of(out, h.shape[0])  # raises the precise error
        out = self.user_cell(self.layout.unflatten(h), x)
        return self.layout.flatten(self.layout.parts_of(out, h.shape[0]))


class _BPTTFunction(torch.autograd.Function):
    """Sequential forward; the adjoint system solved by the plan's method on backward."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, h0: Tensor, xs: Tensor, *params: Tensor) -> Tensor:
        B, T = xs.shape[:2]
        h, xd = h0.detach(), xs.detach()
        chain = None
        if plan.forward is not None:  # the states by a parallel solve (e.g. newton)
            solver, stopping = plan.forward
            problem = RecurrenceForward(plan.cell, h, xd, jacobian=plan.jacobian)
            sol = solver.solve(problem, stopping)
            plan.info.forward_solution = sol
            hs = sol.value  # (B, T, F); a sequential backward rebuilds its chain from h0
        elif plan.keep_chain and any(ctx.needs_input_grad[1:]):
            # keep the step-by-step graph: the sequential method back-propagates through it
            with torch.enable_grad():
                h = h.requires_grad_()
                chain = []
                for t in range(T):
                    h = plan.cell(h, xd[:, t])
                    chain.append(h)
            hs = torch.stack([c.detach() for c in chain], dim=1)  # (B, T, F)
        else:
            steps = []
            for t in range(T):
                h = plan.cell(h, xd[:, t])
                steps.append(h)
            hs = torch.stack(steps, dim=1)  # (B, T, F)
        _check_finite_hidden(hs)
        ctx.plan = plan
        ctx.chain = chain
        ctx.save_for_backward(h0, xs, hs, *params)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_hs: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        h0, xs, hs, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        inputs = (h0, xs, hs, grad_hs)
        graphed = _graphed_backward(plan, inputs, params, needs) if plan.captured else None
        if graphed is not None:
            dh0, dxs, dwanted = graphed(plan, inputs, params, needs)
        else:
            dh0, dxs, dwanted, sol = _adjoint_grads(plan, inputs, params, needs, ctx.chain)
            plan.info.solution = sol
        plan.info.backward_calls += 1
        it = iter(dwanted)
        dparams = [next(it) if n else None for n in needs[3:]]
        return (None, dh0 if needs[1] else None, dxs, *dparams)


def _adjoint_grads(
    plan: _Plan,
    inputs: Sequence[Tensor],
    params: Sequence[Tensor],
    needs: Sequence[bool],
    chain: Any = None,
) -> tuple[Tensor, Tensor | None, list[Tensor | None], Solution]:
    """The backward's work: the adjoint problem, its solve, the input gradients.

    Returns:
        (dL/dh0, dL/dxs or None, [dL/dp for the params that need one], the Solution).
    """
    problem = _adjoint_problem(plan, inputs, needs, chain)
    sol = plan.solver.solve(problem, plan.backward)
    wanted = [p for p, n in zip(params, needs[3:], strict=True) if n]
    dh0, dxs, dwanted = problem.input_grads(sol.value, wanted)
    return dh0, dxs, dwanted, sol


def _adjoint_problem(
    plan: _Plan, inputs: Sequence[Tensor], needs: Sequence[bool], chain: Any = None
) -> RecurrenceAdjoint:
    h0, xs, hs, grad_hs = inputs
    h_prev = torch.cat([h0.detach()[:, None], hs[:, :-1]], dim=1)  # (B, T, F): h_0..h_{T-1}
    return RecurrenceAdjoint(
        plan.cell,
        h_prev,
        xs,
        grad_hs,
        xs_grad=bool(needs[2]),
        chain=chain,
        jacobian=plan.jacobian,
        structure=plan.structure,
        fast=plan.fast,
    )


#: Captured backward passes by cell, parameters and shapes (least recently used dropped).
GRAPHED_CACHE = 4
_GRAPHED = graphs.GraphCache(GRAPHED_CACHE)


def clear_graphed_backwards() -> None:
    """Drop every captured backward (`capture` of a direct method) and its device memory."""
    _GRAPHED.invalidate()


class _GraphedBackward:
    """A direct method's backward up to the adjoints, captured in one CUDA graph over static
    copies of its inputs (h0, xs, hs, grad_hs): the adjoint problem's rows, the Jacobians,
    the scan and a NaN/Inf flag. The input gradients then run eagerly: the cell's forward on
    the replayed rows, recorded anew at every call, and its backward (a backward inside the
    capture waits on the parameters' gradient streams, which invalidates it, and a graph
    recorded once is refused after an in-place update of the parameters). The parameters
    are read where they live, so in-place updates (optimizer steps) are seen by every
    replay."""

    def __init__(self, plan: _Plan, inputs, needs) -> None:
        def body(*static: Tensor) -> tuple[RecurrenceAdjoint, Tensor, Tensor]:
            problem = _adjoint_problem(plan, static, needs)
            adjoints = direct_value(plan.solver, problem)
            flag = torch.linalg.vector_norm(adjoints, ord=math.inf)  # NaN/Inf where they are
            return problem, adjoints, flag

        self.call = graphs.CapturedCall(body, *inputs)

    def __call__(
        self, plan: _Plan, inputs: Sequence[Tensor], params: Sequence[Tensor], needs
    ) -> tuple[Any, Any, list[Any]]:
        """Replay on these inputs; the gradients and `plan.info.solution`."""
        problem, adjoints, flag = self.call(*inputs)
        solver = plan.solver
        if not math.isfinite(float(flag)):  # the one host read
            raise_nonfinite(solver.name, adjoints, 1)
        wanted = [p for p, n in zip(params, needs[3:], strict=True) if n]
        problem.rerecord()  # the cell's forward on the replayed rows, recorded now
        dh0, dxs, dwanted = problem.input_grads(adjoints, wanted)
        B = adjoints.shape[0]
        stats = {"graphed_backward": True, **solver.options()}
        plan.info.solution = Solution(  # the replay's buffers are reused: a copy leaves
            adjoints.clone(), torch.ones(B, dtype=torch.bool, device=adjoints.device), 1, 1,
            stats=stats,
        )  # fmt: skip
        return dh0, dxs, dwanted


def _graphed_backward(plan: _Plan, inputs, params, needs) -> _GraphedBackward | None:
    """The cached captured backward of this key (captured now at first use); None when a
    capture failed for it (the ordinary backward runs, with one warning per key)."""
    shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
    key = (
        plan.structure, plan.jacobian_given, plan.solver, plan.fast, plan.layout.features,
        tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in params), tuple(needs), shapes,
    )  # fmt: skip

    def make() -> _GraphedBackward | None:
        try:
            return _GraphedBackward(plan, inputs, needs)
        except Exception as e:  # never let an optimisation break a backward
            warnings.warn(
                f"capturing the backward failed ({type(e).__name__}: {e}); "
                "this shape runs the ordinary backward",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    return _GRAPHED.get(key, make)


def _check_finite_hidden(hs: Tensor) -> None:
    if bool(torch.isfinite(hs).all()):  # one host read per forward
        return
    t = int((~torch.isfinite(hs)).flatten(2).any(2).any(0).int().argmax())
    raise NonFiniteError(
        f"the hidden state became NaN or Inf at time step {t} (the cell's output for xs[:, {t}])"
    )


def _default_params(cell: Any) -> list[Tensor]:
    owner = cell
    if inspect.ismethod(cell) and isinstance(cell.__self__, nn.Module):
        owner = cell.__self__
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def _undeclared_leaves(out: Tensor, declared: Sequence[Tensor]) -> list[Tensor]:
    """Leaves requiring grad that `out` depends on but that are not in `declared` (whose
    gradients would silently be lost). Declared non-leaf tensors stop the walk."""
    leaf_ids = {id(t) for t in declared if t.grad_fn is None}
    stops = {t.grad_fn for t in declared if t.grad_fn is not None}
    found, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None and id(var) not in leaf_ids:
            found.append(var)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _as_parts(h0: Any) -> tuple[list[Tensor], bool]:
    if isinstance(h0, Tensor):
        return [h0], False
    if isinstance(h0, tuple | list) and h0 and all(isinstance(p, Tensor) for p in h0):
        return list(h0), True
    raise TypeError(f"h0 must be a tensor or a tuple of tensors, got {type(h0).__name__}")


def _check_inputs(parts: list[Tensor], xs: Tensor, batch_first: bool) -> None:
    layout_name = "(B, T, D)" if batch_first else "(T, B, D)"
    if not isinstance(xs, Tensor):
        raise TypeError(f"xs must be a tensor {layout_name}, got {type(xs).__name__}")
    min_dim = 3 if xs.dtype.is_floating_point or xs.dtype.is_complex else 2
    if xs.dim() < min_dim:
        raise ValueError(
            f"xs must be {layout_name} (batch_first={batch_first}), got shape {tuple(xs.shape)}; "
            "add a feature dimension for scalar inputs (xs[..., None])"
        )
    B, T = (xs.shape[0], xs.shape[1]) if batch_first else (xs.shape[1], xs.shape[0])
    if T == 0:
        raise ValueError("xs has no time steps (T = 0)")
    for i, p in enumerate(parts):
        name = "h0" if len(parts) == 1 else f"h0[{i}]"
        if p.dim() < 1 or p.shape[0] != B:
            raise ValueError(
                f"{name} has shape {tuple(p.shape)} but xs {tuple(xs.shape)} has batch size {B} "
                f"(batch_first={batch_first}); h0 must be (B, ...)"
            )
        if not p.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
        if p.dtype != parts[0].dtype or p.device != parts[0].device:
            raise ValueError("all parts of h0 must share one dtype and device")
        if p.device != xs.device:
            raise ValueError(f"h0 is on {p.device} but xs is on {xs.device}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{name} holds NaN or Inf")
    if xs.dtype.is_floating_point:
        bad = ~torch.isfinite(xs)
        if bool(bad.any()):
            per_step = (bad if batch_first else bad.transpose(0, 1)).flatten(2).any(2)  # (B, T)
            t = int(per_step.any(0).int().argmax())
            b = int(per_step[:, t].int().argmax())
            raise ValueError(f"xs holds NaN or Inf at time step {t} (batch item {b})")


def backprop_through(
    cell: Callable[[State, Tensor], State],
    h0: State,
    xs: Tensor,
    method: str | Solver = "jacobi",
    *,
    params: Sequence[Tensor] | None = None,
    batch_first: bool = True,
    backward: Stopping | None = None,
    forward_method: str | Solver | None = None,
    forward: Stopping | None = None,
    jacobian: Callable[[Tensor, Tensor, bool], Tensor] | None = None,
    fast_vjp: bool = True,
    **options: Any,
) -> tuple[State, BackpropInfo]:
    """Run h_t = cell(h_{t-1}, x_t) for t = 1..T sequentially; back-propagate by `method`.

    The returned hidden states are differentiable. On `.backward()` the adjoint recursion of
    BPTT (see the module docstring) is solved by `method` with vector-Jacobian products over
    all time steps at once, and the gradients w.r.t. `params`, h0 and xs are accumulated
    exactly like autograd would accumulate them through the sequential loop. With zero
    tolerances and the default budget every method gives autograd's gradients to float
    rounding; `max_iters=k` < T with Jacobi gives k-step truncated BPTT (a
    `ConvergenceWarning` says so).

    Args:
        cell: `cell(h, x) -> h_next`; h is a tensor (N, *S) or a tuple of them (e.g. (h, c)),
            x is (N, *D). A torch `RNNCell`, `GRUCell` or `LSTMCell` may be passed as is (its
            (x, h) argument order is handled). The backward calls it on all T steps at once
            (N = B*T), so it must treat rows independently and be deterministic (no dropout).
        h0: the initial state, (B, *S) or a tuple of such tensors.
        xs: inputs (B, T, *D), or (T, B, *D) with `batch_first=False`; integer (token) inputs
            may be (B, T).
        method: the adjoint solve's method: "sequential" (ordinary BPTT), "jacobi",
            "jacobi_gs", "gs_jacobi", "scan" (exact, by an associative scan over the cell
            Jacobians), "newton", "quasi_newton", or a Solver.
        params: the tensors the cell is differentiated with respect to. Default: the
            parameters of `cell` when it is an nn.Module or a bound method of one. A cell that
            uses other tensors requiring grad raises ValueError (their gradient would be lost).
        batch_first: layout of xs and of the returned states.
        backward: the adjoint solve's `Stopping` (default: exact, `capture=False`). Its
            `capture` with a direct method (`scan`) replays the whole backward up to the
            adjoints from a CUDA graph cached by cell, parameters (their storage: in-place
            updates are seen) and shapes, at most `GRAPHED_CACHE` of them
            (`clear_graphed_backwards()` frees them); the adjoints are checked for NaN/Inf after
            each replay, a capture that fails warns once and that shape runs the ordinary
            backward. With an iterative method, `capture=True` captures the adjoint loop's
            chunks anew at every backward (the system is rebuilt each time); "auto" does not.
        forward_method: compute the hidden states by this method instead of the sequential
            loop (e.g. "newton", "jacobi": a parallel forward and a parallel backward in one
            training step); `info.forward_solution` holds its Solution.
        forward: that forward solve's `Stopping` (default: exact). With a tolerance the
            states, hence the gradients, are those of an inexact forward.
        jacobian: optional `jacobian(h, x, diagonal)`, d cell(h, x) / d h on flat states
            (N, F) -> (N, F, F) (or (N, F) when diagonal), for the scan and Newton methods;
            default: closed form for torch's cells, else batched vector-Jacobian products.
        fast_vjp: for a `VanillaRNN.step` or a torch `RNNCell`/`GRUCell`/`LSTMCell`, sweep with
            J^T a formed from operands computed once (`ffsolve.problems.cells`: elementwise
            products and one matmul, no autograd call per sweep); False: autograd per sweep.
        **options: the method's options (`block_size`, `window`, `chunk`) and `Stopping`
            fields of the backward (atol=..., max_iters=...), which replace `backward`'s.

    Returns:
        (hs, info): the states h_1..h_T, (B, T, *S) (a tuple for a tuple state; time-major
        with `batch_first=False`), and a `BackpropInfo` that backward fills in.

    Raises:
        ValueError: bad shapes, h0/xs batch mismatch, NaN or Inf in xs or h0 (the time step
            is named), an unknown method, undeclared tensors requiring grad, capture=True
            where no CUDA graph can be captured.
        TypeError: a non-tensor h0/xs, a cell returning the wrong structure.
        ffsolve.NonFiniteError: the hidden state or the adjoints became NaN or Inf.

    Example:
        >>> gru = torch.nn.GRUCell(3, 16)
        >>> hs, info = ffsolve.backprop_through(gru, torch.zeros(8, 16), xs, method="jacobi")
        >>> loss_fn(hs).backward()          # gru's .grad filled, as by autograd
        >>> info.num_iters, info.converged
    """
    if not callable(cell):
        raise TypeError(f"cell must be callable, got {type(cell).__name__}")
    fields, options = Stopping.split(options)
    solver = get_solver(method, **options)
    # fail now, not inside backward
    backward = (
        Stopping(capture=False).replace(**fields)
        if backward is None
        else Stopping.merged(backward, **fields)
    )
    parts, is_tuple = _as_parts(h0)
    _check_inputs(parts, xs, batch_first)
    user_cell = cell
    if isinstance(cell, nn.RNNCellBase):  # torch's cells take (input, hidden)
        user_cell = lambda h, x: cell(x, h)  # noqa: E731
    params = _default_params(cell) if params is None else list(params)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
    unique: dict[int, Tensor] = {id(p): p for p in params}
    params = list(unique.values())

    layout = _Layout(parts, is_tuple)
    x_bt = xs if batch_first else xs.transpose(0, 1)  # (B, T, *D)
    B, T = x_bt.shape[:2]
    summary = backward.summary()
    info = BackpropInfo(
        method=solver.name,
        options={
            **{k: v for k, v in solver.options().items() if v is not None},
            **{k: summary[k] for k in ("atol", "rtol", "max_iters")},
        },
        length=T,
        batch=B,
    )
    if solver.direct:  # the whole backward may be one captured graph (decided here, once)
        captured = captures(backward, parts[0].device)
        stop = backward.replace(capture=False)
    else:  # the adjoint loop is rebuilt at every backward: captured only when forced
        captured = False
        stop = backward.forced_capture_only()
    plan = _Plan(user_cell, layout, solver, stop, info)
    plan.captured = captured
    if forward_method is not None:
        plan.forward = (get_solver(forward_method), forward or Stopping(record=backward.record))
    elif forward is not None:
        raise TypeError("forward given without forward_method")
    # cell-provided, else closed form for torch's RNN/GRU/LSTM cells, else None (autograd)
    plan.jacobian = jacobian if jacobian is not None else torch_cell_jacobian(cell)
    plan.structure = cell
    plan.fast = fast_vjp
    plan.jacobian_given = jacobian
    h0_flat = layout.flatten(parts)  # (B, F)
    if torch.is_grad_enabled():
        # one step with a graph: checks the cell's output and finds tensors it uses that
        # require grad but were not declared (their gradients would silently be lost)
        with torch.enable_grad():
            probe_h = h0_flat.detach().requires_grad_()
            probe = plan.cell(probe_h, x_bt[:, 0].detach())
        if probe.requires_grad:
            lost = _undeclared_leaves(probe, [probe_h, *params])
            if lost:
                shapes = ", ".join(str(tuple(t.shape)) for t in lost)
                raise ValueError(
                    f"the cell uses {len(lost)} tensor(s) that require grad but are not in "
                    f"params (shapes {shapes}); pass them with params=[...] (the default is "
                    "the parameters of an nn.Module cell or of a bound method's module)"
                )
    hs_flat = _BPTTFunction.apply(plan, h0_flat, x_bt, *params)  # (B, T, F)
    hs = layout.unflatten(hs_flat.reshape(B * T, layout.features))
    if is_tuple:
        hs = tuple(p.view(B, T, *p.shape[1:]) for p in hs)  # each (B, T, *S_i)
        if not batch_first:
            hs = tuple(p.transpose(0, 1) for p in hs)
    else:
        hs = hs.view(B, T, *hs.shape[1:])  # (B, T, *S)
        if not batch_first:
            hs = hs.transpose(0, 1)
    return hs, info
