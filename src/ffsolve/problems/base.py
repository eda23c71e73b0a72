"""The problem protocol: a lower-triangular system x_t = f_t(x_<t) that solvers can sweep.

A problem owns the model and the fixed inputs (noise, data); a solver owns the iteration.
Solvers see positions through a canonical view of shape (B, T, F): leading dimensions are
flattened into the batch B, the position dimension is T, trailing dimensions into F.

Every problem has three things:

| member | what it is |
|---|---|
| `length` | T, the number of positions |
| `initial()` | the starting iterate, positions along `dim` (the solver copies it) |
| `evaluate(x, start, stop)` | f at positions [start, stop) given the iterate x |

and may offer more through optional hooks, each with a generic default, so a solver never
asks what kind of problem it has:

| hook | used by | default |
|---|---|---|
| `dim` | every method | 1 |
| `prepare()` | every solve, once before the first sweep (bake weights) | nothing |
| `evaluate_at(x, index)` | `jacobi_gs` (a strided set of positions) | evaluate all, select |
| `evaluate_window(x, start, width)` | window methods, start on the device | evaluate all, select |
| `window_on_device` | window methods keep the window on the device even uncaptured | False |
| `block_sweep(x, K)`, `block_sweep_evals(K)` | `jacobi_gs` | K calls of `evaluate_at` |
| `stepper(x)` | `sequential` (a cached or incremental step) | `evaluate(x, t, t + 1)` |
| `num_evals_per_step` | the record's `num_evals` | 1 |
| `capturable` | capture="auto": `evaluate` is static and host-free | False |
| `capturable_stepper` | capture="auto" for `sequential`: the stepper restarts at step 0 | False |
| `first_order` | `newton`, `quasi_newton`: x_t reads x_{t-1} only | False |
| `jacobians(x, start, stop, diagonal)` | `newton`, `quasi_newton` | batched VJPs of `evaluate` |
| `linear_recurrence()` | `scan`: x_t = A_t x_{t-1} + b_t | TypeError (nonlinear) |
| `solve_recurrence(rec, scan)` | `scan`, `newton`, `quasi_newton`: the linear solve | `scan(rec)` |
| `linear_part(start, stop)` | `picard`, `linear="problem"`: A_t in f_t = A_t x + d_t | identity |
| `noise_variance()` | `Stopping(rule="variance")`: each step's noise variance (T,) | ones |
| `guess(x, window, certified)` | window methods: proposals for uncertified positions | None |
| `settled(x, certified)` | every iterative method: positions final without a sweep | None |
| `tune_key()` | `auto`: tells remembered choices apart beyond class and shape | its models' ids |
| `graphs` | the captured loops and forwards replayed on this problem | an empty `GraphCache` |

`docs/problems.md` shows a new problem family added as new files only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ffsolve.graphs import GraphCache

__all__ = [
    "FunctionProblem",
    "LinearRecurrence",
    "LinearRecurrenceProblem",
    "Problem",
    "canonical_shape",
    "check_finite",
]


def check_finite(name: str, t: Tensor) -> None:
    """ValueError naming `name` and the first bad index when t holds NaN or Inf: an input
    (noise, data) with NaN would otherwise give a finite but meaningless solution."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds NaN or Inf (first at index {index})")


def canonical_shape(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    """(B, T, F) for a tensor of `shape` whose positions lie along `dim` (already normalised)."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


class Problem:
    """A triangular system the solvers can iterate on.

    Subclasses set `length` (T, the number of positions) and `dim`, and implement `initial`
    and `evaluate`. They may override `evaluate_at` (a strided set of positions, used by
    `jacobi_gs`) and `stepper` (a cached or incremental sequential step, used by
    `sequential`) when the model can do better than a full evaluation.

    The system: x_t = f_t(x_0, ..., x_{t-1}) for t = 0..T-1, where position t is index t of
    the state along `dim`.
    """

    length: int
    dim: int = 1

    #: `evaluate` (and `evaluate_at`) on the full window have static shapes and read nothing
    #: on the host, so the solve loop may capture sweeps in a CUDA graph (`capture="auto"`).
    capturable: bool = False
    #: every `step(t)` of `stepper` has static shapes and reads nothing on the host, and
    #: `step(0)` starts over from the contents of `x` (a stepper can be replayed), so the
    #: whole sequential loop may be captured in one CUDA graph.
    capturable_stepper: bool = False

    @property
    def graphs(self) -> GraphCache:
        """The CUDA graphs captured on this problem (solver loops, forwards), kept across
        solves and replayed; `problem.graphs.invalidate()` drops them when what they read by
        address was replaced (e.g. new weight tensors)."""
        cache = getattr(self, "_graph_cache", None)
        if cache is None:
            cache = self._graph_cache = GraphCache(16)
        return cache

    def prepare(self) -> None:
        """Called once at the start of every solve, before any `evaluate` or `stepper`: bake
        what does not change during a solve (masks into weights, fused layouts), in place into
        buffers kept across solves, so a captured loop replayed later sees updated weights."""

    def initial(self) -> Tensor:
        """The starting iterate, a tensor with positions along `dim` (the solver copies it)."""
        raise NotImplementedError

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        """f at positions [start, stop) given the iterate x.

        Args:
            x: the current iterate, shaped like `initial()`.
            start, stop: the window of positions to compute.

        Returns:
            A tensor shaped like x narrowed to stop - start positions along `dim`.
        """
        raise NotImplementedError

    #: `evaluate_window` computes only the window (it gathers the window's inputs, times and
    #: noise by a device offset), as cheaply as `evaluate` on the same positions: a window
    #: method then keeps its window on the device even where the loop is not captured
    #: (no host read per sweep). Without it, only a captured loop does (by the default
    #: `evaluate_window`), and an eager one places the window from the host.
    window_on_device: bool = False

    def evaluate_window(self, x: Tensor, start: Tensor, width: int) -> Tensor:
        """f at positions [start, start + width) given the iterate x, where `start` is a ()
        long tensor on x's device (a window that moves on the device: no host read, so the
        sweep can be captured), shaped like x narrowed to `width` positions along `dim`.

        The generic default evaluates every position and gathers the window (as costly as a
        full sweep); a problem whose steps are independent calls (a sampler's timesteps)
        gathers the window's inputs instead and sets `window_on_device`."""
        index = torch.arange(width, device=x.device) + start
        return self.evaluate(x, 0, self.length).index_select(self.dim, index)

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        """f at the positions in `index` (a 1-D long tensor, increasing), shaped like x with
        len(index) positions. The default evaluates the full window and selects."""
        return self.evaluate(x, 0, self.length).index_select(self.dim, index)

    def block_sweep(self, x: Tensor, block_size: int) -> Tensor:
        """One Jacobi-GS iteration over blocks of `block_size` positions: inner step j sets
        position j of every block from the freshest values (Song et al. 2021, Alg. 2).

        A problem may override it with a cheaper map with the two properties the solver
        relies on: when the positions before p are final, the whole block holding p comes
        out final (`JacobiGS.guaranteed`), and position t of the result is f_t of values that
        equal the result wherever the input and the result agree before t (so an unchanged
        prefix is certified, as for Jacobi).
        The default makes `block_size` calls of `evaluate_at`.

        Returns:
            the new iterate, shaped like x.
        """
        work = x.clone()
        d = self.dim
        for j in range(block_size):
            index = torch.arange(j, self.length, block_size, device=x.device)
            work.index_copy_(d, index, self.evaluate_at(work, index))
        return work

    def block_sweep_evals(self, block_size: int) -> int:
        """Model calls counted for one `block_sweep`."""
        return block_size * self.num_evals_per_step

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        """A sequential step for the ordinary loop: `step(t)` returns f_t (one position, shaped
        like x narrowed to 1 along `dim`) given that positions < t of `x` are final.

        The solver writes each result into `x` (in place) before asking for the next position,
        so an incremental implementation may keep a cache and read x[t - 1] from `x`.
        """
        return lambda t: self.evaluate(x, t, t + 1)

    @property
    def num_evals_per_step(self) -> int:
        """Model calls counted for one `evaluate` (overridable for problems that batch calls)."""
        return 1

    # --- optional hooks of the scan and Newton methods ----------------------------------
    #: True when position t reads position t - 1 only (x_t = f_t(x_{t-1})), which the Newton
    #: methods need; a problem declares it, solvers never guess it.
    first_order: bool = False

    def linear_recurrence(self) -> LinearRecurrence:
        """The system as x_t = A_t x_{t-1} + b_t, for the `scan` method. Only linear problems
        provide it."""
        raise TypeError(
            f"{type(self).__name__} is not a linear recurrence (it has no linear_recurrence()); "
            "the 'scan' method needs one: use 'newton' or 'jacobi' for nonlinear systems"
        )

    def solve_recurrence(self, rec: LinearRecurrence, scan: Callable[..., Tensor]) -> Tensor:
        """The solution (B, T, F) of the linear recurrence `rec` (x_{-1} = 0), by the solver's
        `scan`: the scan and Newton methods hand their linear solve to the problem, so a
        problem spread over processes (`Sharded`) can solve it by parts. The default solves
        every position at once, `scan(rec)`.

        Args:
            rec: the recurrence; its `coeffs(start, stop)` are asked only where the scan runs.
            scan: `scan(rec, start=s, stop=e, exchange=None)`: positions [s, e) from a zero
                state, (B, e - s, F); with `exchange` (`ffsolve.solvers.scan.Exchange`), the
                slice's affine map is handed to it and the state it returns enters the slice.
        """
        return scan(rec)

    def linear_part(self, start: int, stop: int) -> Tensor | None:
        """A_t for t in [start, stop) when each step is f_t(x) = A_t x + d_t(x) with a known
        linear part (a sampler's x_t coefficient), as (B, n, F), (n, F) or (n, 1) factors of
        a diagonal A_t, or None for the identity (Picard's classic form,
        x_t = x_{t-1} + (f_t(x_{t-1}) - x_{t-1})). Used by `picard` with `linear="problem"`."""
        return None

    def noise_variance(self) -> Tensor:
        """(T,) the variance of the noise each step adds (a sampler's sigma_t^2), which
        `Stopping(rule="variance")` scales its tolerance by. Default: ones (the rule is then a
        root-mean-square one)."""
        return torch.ones(self.length)

    def tune_key(self) -> Hashable:
        """What, besides the class, shape, dtype and device, tells solves apart for
        `method="auto"`'s remembered choices. Default: the identity of the problem's models
        (its `torch.nn.Module` attributes), so another model of the same shape tunes anew."""
        return tuple(id(v) for v in vars(self).values() if isinstance(v, torch.nn.Module))

    def guess(self, x: Tensor, window: Any, certified: Tensor) -> Tensor | None:
        """Proposals for the uncertified positions of the `window` (a
        `ffsolve.solvers.Window`: `take`, `positions()`, `bounds()` where the host knows
        them, and `frontier`, the end of the furthest window swept before) about to be swept
        by a window method, shaped like x narrowed to the window, or None (no guess, the
        default). The loop writes them only where the position is at least the item's
        certified prefix `certified` (B,) and the sweep counts: exactness never depends on
        them, a good guess (an n-gram seen before, the last value of the previous window)
        saves sweeps. Called inside the step: where the window moves on the device, the
        guess must read nothing on the host."""
        return None

    def settled(self, x: Tensor, certified: Tensor) -> Tensor | None:
        """(B,) long: each item's prefix that is final given the iterate `x` after a sweep
        and its certified prefix `certified` (B,), at least `certified`, where the system's
        structure says more than the certificate (a decoder's positions after a certified
        end-of-sequence token are padding, whatever the model would say), or None (the
        default: the certificate alone). Called inside the step: no host read."""
        return None

    def jacobians(self, x: Tensor, start: int, stop: int, diagonal: bool = False) -> Tensor:
        """J_t = d f_t / d x_{t-1} for t in [start, stop) at the iterate x (J_0 = 0).

        The generic default (for `first_order` problems) takes F batched vector-Jacobian
        products of `evaluate(x, start, stop)`: row i of every J_t at once, since f_t reads
        x_{t-1} only. Problems with a cheaper or cell-provided Jacobian override it.

        Args:
            x: the iterate, shaped like `initial()`.
            start, stop: the positions whose Jacobians are formed.
            diagonal: return only the diagonals.

        Returns:
            (B, n, F, F), or (B, n, F) when `diagonal`, with n = stop - start.
        """
        if not self.first_order:
            raise TypeError(
                f"{type(self).__name__} is not declared first-order (x_t = f_t(x_{{t-1}})); "
                "the Newton methods need that (set first_order = True if it is)"
            )
        B, T, F = canonical_shape(x.shape, self.dim)
        lo = max(start - 1, 0)
        with torch.enable_grad():
            xw = x.detach().narrow(self.dim, lo, stop - lo).clone().requires_grad_()
            full = torch.cat(
                [
                    x.detach().narrow(self.dim, 0, lo),
                    xw,
                    x.detach().narrow(self.dim, stop, T - stop),
                ],
                dim=self.dim,
            )
            out = self.evaluate(full, start, stop).reshape(B, stop - start, F)
        g = _rows_by_vjp(out, xw, F)  # (F, *xw.shape): grad of sum_t f_t[i] w.r.t. x_{t-1}
        g = g.reshape(F, B, -1, F)[:, :, : stop - start]  # row i of J_t sits at x_{t-1}
        J = g.permute(1, 2, 0, 3)  # (B, n', F, F): J[b, k, i, j] = d f[i] / d x[j]
        if start == 0:  # J_0 = 0: position 0 has no predecessor
            J = torch.cat([torch.zeros_like(J[:, :1]), J[:, : stop - start - 1]], dim=1)
        return J.diagonal(dim1=2, dim2=3) if diagonal else J


def _rows_by_vjp(out: Tensor, inp: Tensor, F: int) -> Tensor:
    """grad of out[..., i].sum() w.r.t. inp for every i: (F, *inp.shape). Batched over i
    (`is_grads_batched`) when the graph allows it, one backward pass per i otherwise."""
    if not out.requires_grad:
        return inp.new_zeros(F, *inp.shape)
    eye = torch.eye(F, dtype=out.dtype, device=out.device)  # (F, F)
    seeds = eye.view(F, *([1] * (out.dim() - 1)), F).expand(F, *out.shape)  # (F, *out.shape)
    try:
        (g,) = torch.autograd.grad(out, inp, seeds, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one VJP per row
        rows = []
        for i in range(F):
            (gi,) = torch.autograd.grad(out, inp, seeds[i], retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(inp) if gi is None else gi)
        return torch.stack(rows)
    return inp.new_zeros(F, *inp.shape) if g is None else g


@dataclass(frozen=True)
class LinearRecurrence:
    """x_t = A_t x_{t-1} + b_t for t = 0..T-1 with x_{-1} = 0 (A_0 is never used).

    Attributes:
        b: (B, T, F) the offsets.
        coeffs: `coeffs(start, stop)` gives A_t for t in [start, stop): (B, n, F, F) when
            `kind` is "dense", (B, n, F) when "diagonal", or a function v (B, n, F) ->
            A_t v_t (B, n, F) when "matvec". Asked one chunk at a time, so a problem can form
            its matrices lazily and memory stays one chunk of matrices.
        kind: "dense", "diagonal" or "matvec".
    """

    b: Tensor
    coeffs: Callable[[int, int], Tensor | Callable[[Tensor], Tensor]]
    kind: Literal["dense", "diagonal", "matvec"] = "dense"


class LinearRecurrenceProblem(Problem):
    """A linear recurrence x_t = A_t x_{t-1} + b_t (x_{-1} = 0) as a triangular system.

    Args:
        A: (B, T, F, F) dense or (B, T, F) diagonal coefficients (A[:, 0] is unused).
        b: (B, T, F) offsets.

    Example:
        >>> problem = LinearRecurrenceProblem(A, b)
        >>> ffsolve.solve(problem, method="scan").value      # (B, T, F)
    """

    first_order = True

    def __init__(self, A: Tensor, b: Tensor) -> None:
        if b.dim() != 3 or A.dim() not in (3, 4) or A.shape[:3] != b.shape:
            raise ValueError(
                f"b must be (B, T, F) and A (B, T, F, F) or (B, T, F); got A {tuple(A.shape)}, "
                f"b {tuple(b.shape)}"
            )
        if A.dim() == 4 and A.shape[3] != A.shape[2]:
            raise ValueError(f"dense A must be (B, T, F, F), got {tuple(A.shape)}")
        if b.shape[1] == 0:
            raise ValueError("the recurrence is empty (T = 0)")
        check_finite("A", A)
        check_finite("b", b)
        self.A, self.b = A, b
        self.diagonal = A.dim() == 3
        self.length, self.dim = b.shape[1], 1

    def initial(self) -> Tensor:
        return torch.zeros_like(self.b)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)[:, start:stop]
        A = self.A[:, start:stop]
        ax = A * prev if self.diagonal else (A @ prev[..., None])[..., 0]  # (B, n, F)
        return ax + self.b[:, start:stop]

    def linear_recurrence(self) -> LinearRecurrence:
        kind = "diagonal" if self.diagonal else "dense"
        return LinearRecurrence(self.b, lambda s, e: self.A[:, s:e], kind)

    def jacobians(self, x: Tensor, start: int, stop: int, diagonal: bool = False) -> Tensor:
        A = self.A[:, start:stop]
        if diagonal and not self.diagonal:
            return A.diagonal(dim1=2, dim2=3)
        if not diagonal and self.diagonal:
            return torch.diag_embed(A)
        return A


class FunctionProblem(Problem):
    """A plain function as a triangular system: `fn(x)` returns every position at once.

    Position t of `fn(x)` (index t along `dim`) must depend only on positions < t of x.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x0: Tensor, dim: int = 1) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if not x0.dtype.is_floating_point:
            raise TypeError(f"x0 must have a floating dtype, got {x0.dtype}")
        if x0.dim() == 0:
            raise ValueError("x0 must have at least one dimension (the positions)")
        if not -x0.dim() <= dim < x0.dim():
            raise ValueError(f"dim={dim} is out of range for x0 with {x0.dim()} dimensions")
        self.fn = fn
        self.x0 = x0
        self.dim = dim % x0.dim()
        self.length = x0.shape[self.dim]
        if self.length == 0:
            raise ValueError("x0 has no positions along dim")

    def initial(self) -> Tensor:
        return self.x0

    def _call(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"fn must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"fn changed the shape: got {tuple(out.shape)}, expected {tuple(x.shape)}"
            )
        if out.dtype != x.dtype:
            raise ValueError(f"fn changed the dtype: got {out.dtype}, expected {x.dtype}")
        return out

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self._call(x).narrow(self.dim, start, stop - start)

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        return self._call(x).index_select(self.dim, index)
