"""scan: a linear recurrence x_t = A_t x_{t-1} + b_t solved exactly by an associative scan.

The affine maps x -> A_t x + b_t compose associatively, (A2, b2) o (A1, b1) = (A2 A1,
A2 b1 + b2), so all prefixes follow in ceil(log2 T) parallel steps (Hillis and Steele's
inclusive scan, in plain tensor ops). Dense A_t cost B T F^2 memory, so the time axis is cut
into chunks solved one after another (the last state of a chunk carries into the next): memory
stays O(B T F) plus one chunk of matrices, and the depth is (T / chunk) * ceil(log2 chunk).

On CUDA a small chunk's scan (at most `GRAPH_ELEMENTS` coefficients) is replayed from a CUDA
graph captured once per shape and cached (`capture_chunks`; `clear_graphs` frees them): its
~4 log2(n) kernels cost one launch, which is what a scan of a short sequence spends its time
on.

Exact zeros stay exact: where every b_s of a prefix is zero, every scanned value of that
prefix is a sum of products with a zero factor, hence exactly zero (for finite A). The Newton
methods rely on it (see `ffsolve.solvers.newton`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve import graphs
from ffsolve.problems.base import LinearRecurrence, Problem, check_finite
from ffsolve.solvers.base import Solver, State, Window, check_int

__all__ = ["Exchange", "Scan", "affine_scan", "linear_scan", "auto_chunk", "clear_graphs"]

#: Elements of one chunk of dense matrices when the chunk is chosen automatically (2^25 floats:
#: 128 MiB in float32; the scan holds about three such buffers at once).
CHUNK_ELEMENTS = 1 << 25

#: Largest chunk (coefficients) whose scan is replayed from a cached CUDA graph (8 MiB in
#: float32: past it the kernels' own work outweighs their launches).
GRAPH_ELEMENTS = 1 << 21

#: Cached graphs kept at once (least recently used dropped first).
GRAPH_CACHE = 8


def auto_chunk(B: int, T: int, F: int, kind: str) -> int:
    """Time steps per chunk so that one chunk of coefficients holds about CHUNK_ELEMENTS."""
    per_step = B * F * (1 if kind == "diagonal" else F)
    return max(1, min(T, CHUNK_ELEMENTS // max(per_step, 1)))


def _apply(A: Tensor, v: Tensor, diagonal: bool) -> Tensor:
    """A v per leading index: A (..., F, F) or (..., F), v (..., F) -> (..., F)."""
    return A * v if diagonal else (A @ v[..., None])[..., 0]


def _scan_chunk(A: Tensor, b: Tensor, diagonal: bool, products: bool = False) -> Any:
    """Inclusive Hillis-Steele scan: x_t = A_t x_{t-1} + b_t with x_{-1} = 0 on one chunk.

    Time-major inside (a free view for B = 1), so every shifted slice is one contiguous
    batch of matrices: a level is one fused multiply-add for b and one product for A.

    Args:
        A: (B, n, F, F) or (B, n, F) when diagonal.
        b: (B, n, F).
        products: also return the running products A_t ... A_0 (one more level of products).

    Returns:
        (B, n, F); with `products`, also (B, n, F, F) or (B, n, F).
    """
    B, n, F = b.shape
    A = A.transpose(0, 1).contiguous()  # (n, B, F, F) or (n, B, F)
    b = b.transpose(0, 1).contiguous()  # (n, B, F)
    off = 1
    while off < n:
        # after this step, (A[t], b[t]) is the composition of the maps t-2*off+1 .. t
        if diagonal:
            new = torch.addcmul(b[off:], A[off:], b[:-off])
        else:
            m = (n - off) * B
            new = torch.baddbmm(
                b[off:].reshape(m, F, 1), A[off:].reshape(m, F, F), b[:-off].reshape(m, F, 1)
            ).view(n - off, B, F)
        b = torch.cat([b[:off], new])
        if 2 * off < n or products:  # the last step needs no products of matrices
            AA = A[off:] * A[:-off] if diagonal else torch.matmul(A[off:], A[:-off])
            A = torch.cat([A[:off], AA])
        off *= 2
    return (b.transpose(0, 1), A.transpose(0, 1)) if products else b.transpose(0, 1)


_GRAPHS = graphs.GraphCache(GRAPH_CACHE)


def clear_graphs() -> None:
    """Drop every cached scan graph (and the device memory of its buffers)."""
    _GRAPHS.invalidate()


def _graphable(A: Tensor, b: Tensor) -> bool:
    """A small CUDA chunk, outside any capture, with nothing to differentiate through."""
    return (
        A.is_cuda
        and A.numel() <= GRAPH_ELEMENTS
        and not torch.cuda.is_current_stream_capturing()
        and not (torch.is_grad_enabled() and (A.requires_grad or b.requires_grad))
    )


def _scan_chunk_graphed(A: Tensor, b: Tensor, diagonal: bool) -> Tensor:
    """`_scan_chunk` by a replay of the cached graph of its shape (captured at first use)."""
    key = (tuple(A.shape), tuple(b.shape), A.dtype, b.dtype, A.device, diagonal)

    def make() -> graphs.CapturedCall:
        return graphs.CapturedCall(lambda a, c: _scan_chunk(a, c, diagonal), A, b)

    out = _GRAPHS.get(key, make)(A, b)
    return out.clone(memory_format=torch.contiguous_format)  # the next replay reuses it


def _dense_of(matvec: Callable[[Tensor], Tensor], B: int, n: int, F: int, like: Tensor) -> Tensor:
    """The (B, n, F, F) matrices of a matvec, one basis vector at a time."""
    eye = torch.eye(F, dtype=like.dtype, device=like.device)
    cols = [matvec(eye[j].expand(B, n, F)) for j in range(F)]  # each (B, n, F) = A e_j
    return torch.stack(cols, dim=-1)  # (B, n, F, F)


#: `exchange(P, y) -> h`: given the affine map x_out = P x_in + y of a slice of positions
#: (P (B, F, F), or (B, F) for a diagonal recurrence; y (B, F)), the state h (B, F) entering
#: the slice (a sharded problem's collective; see `Problem.solve_recurrence`).
Exchange = Callable[[Tensor, Tensor], Tensor]


def affine_scan(
    rec: LinearRecurrence,
    *,
    chunk: int | None = None,
    h0: Tensor | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    capture: bool = False,
    start: int = 0,
    stop: int | None = None,
    exchange: Exchange | None = None,
) -> Tensor:
    """x_t = A_t x_{t-1} + b_t for t = start..stop-1, x_{start-1} = h0 (or 0), by chunked scans.

    With `exchange`, the state entering `start` is not known yet: the slice is scanned from
    zero, its affine map (the product of its A_t and its last offset) goes to `exchange`, which
    returns the entering state h, and the slice is fixed up, x_t += (A_t ... A_start) h: from
    the running products when the slice is one chunk, else by a second scan from h (the
    coefficients formed again: memory stays one chunk of matrices).

    Args:
        rec: the recurrence (b and a chunk-wise source of the A_t).
        chunk: time steps per chunk (None: `auto_chunk`).
        h0: (B, F) the state before position `start`; None for zero.
        transform: applied to each chunk's coefficients before use (e.g. a damping factor).
        capture: replay small CUDA chunks from cached CUDA graphs (see the module docstring).
        start, stop: the positions solved (default: all).
        exchange: the entering state from the slice's affine map (see `Exchange`); with h0 None.

    Returns:
        (B, stop - start, F).
    """
    b = rec.b
    B, T, F = b.shape
    stop = T if stop is None else stop
    if not 0 <= start <= stop <= T:
        raise ValueError(f"positions [{start}, {stop}) are not inside [0, {T})")
    if exchange is not None:
        if h0 is not None:
            raise ValueError("give h0 or exchange, not both")
        return _scan_slice(rec, start, stop, chunk, transform, capture, exchange)
    diagonal = rec.kind == "diagonal"
    n = stop - start
    chunk = chunk or auto_chunk(B, n, F, rec.kind)
    out = None if chunk >= n else b.new_empty(B, n, F)  # one chunk: its scan is the answer
    carry = h0
    for s in range(start, stop, chunk):
        e = min(stop, s + chunk)
        A = _coefficients(rec, s, e, transform)
        bb = b[:, s:e]
        if carry is not None:  # fold the state entering the chunk into its first offset
            bb = torch.cat([bb[:, :1] + _apply(A[:, 0], carry, diagonal)[:, None], bb[:, 1:]], 1)
        if capture and _graphable(A, bb):
            x = _scan_chunk_graphed(A, bb, diagonal)  # (B, e - s, F)
        else:
            x = _scan_chunk(A, bb, diagonal)
        if out is None:
            return x.contiguous()
        out[:, s - start : e - start] = x
        carry = x[:, -1]
    if out is None:  # no positions
        return b[:, start:stop].clone()
    return out


def _coefficients(
    rec: LinearRecurrence, s: int, e: int, transform: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """A_t for t in [s, e) as (B, n, F, F) or (B, n, F) tensors (a matvec made dense)."""
    A = rec.coeffs(s, e)
    if rec.kind == "matvec":
        B, _, F = rec.b.shape
        A = _dense_of(A, B, e - s, F, rec.b)  # type: ignore[arg-type]
    return A if transform is None else transform(A)  # type: ignore[return-value]


def _scan_slice(
    rec: LinearRecurrence,
    start: int,
    stop: int,
    chunk: int | None,
    transform: Callable[[Tensor], Tensor] | None,
    capture: bool,
    exchange: Exchange,
) -> Tensor:
    """`affine_scan` of positions [start, stop) whose entering state `exchange` gives."""
    b = rec.b
    B, _, F = b.shape
    n = stop - start
    diagonal = rec.kind == "diagonal"
    if n == 0:  # an empty slice is the identity map (and still takes part in the exchange)
        eye = torch.eye(F, dtype=b.dtype, device=b.device)
        exchange(b.new_ones(B, F) if diagonal else eye.expand(B, F, F), b.new_zeros(B, F))
        return b[:, start:stop].clone()
    chunk = chunk or auto_chunk(B, n, F, rec.kind)
    total = carry = running = x = None
    for s in range(start, stop, chunk):
        e = min(stop, s + chunk)
        A = _coefficients(rec, s, e, transform)
        bb = b[:, s:e]
        if carry is not None:
            bb = torch.cat([bb[:, :1] + _apply(A[:, 0], carry, diagonal)[:, None], bb[:, 1:]], 1)
        x, running = _scan_chunk(A, bb, diagonal, products=True)  # (B, e-s, F), A_t ... A_s
        last = running[:, -1]  # the chunk's map: (B, F, F) or (B, F)
        total = last if total is None else (last * total if diagonal else last @ total)
        carry = x[:, -1]
    assert total is not None and carry is not None and x is not None and running is not None
    h = exchange(total, carry)  # (B, F), the state entering `start`
    if chunk >= n:  # x_t = y_t + (A_t ... A_start) h: exact zeros stay exact (h = 0 gives y)
        return x + _apply(running, h[:, None], diagonal)
    return affine_scan(rec, chunk=chunk, h0=h, transform=transform, capture=capture,
                       start=start, stop=stop)  # fmt: skip


def linear_scan(A: Tensor, b: Tensor, h0: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """Solve x_t = A_t x_{t-1} + b_t, t = 0..T-1, with x_{-1} = h0 (zero when None).

    Args:
        A: (B, T, F, F) dense or (B, T, F) diagonal coefficients.
        b: (B, T, F).
        h0: (B, F) or None.
        chunk: time steps per chunk (None: automatic).

    Returns:
        x, (B, T, F).

    Example:
        >>> x = linear_scan(torch.rand(2, 100, 4) * 0.9, torch.randn(2, 100, 4))
    """
    if b.dim() != 3 or A.dim() not in (3, 4) or A.shape[:3] != b.shape:
        raise ValueError(
            f"b must be (B, T, F) and A (B, T, F, F) or (B, T, F); got A {tuple(A.shape)}, "
            f"b {tuple(b.shape)}"
        )
    for name, t in (("A", A), ("b", b), ("h0", h0)):
        if t is not None:
            check_finite(name, t)
    kind = "diagonal" if A.dim() == 3 else "dense"
    return affine_scan(LinearRecurrence(b, lambda s, e: A[:, s:e], kind), chunk=chunk, h0=h0)


@dataclass(frozen=True)
class Scan(Solver):
    """Exact solve of a linear recurrence x_t = A_t x_{t-1} + b_t by an associative scan.

    One sweep gives the solution (exact up to floating-point rounding of a differently
    ordered computation, not bitwise the sequential loop), so `num_iters` is 1. Needs a
    problem with `linear_recurrence()` (e.g. `RecurrenceAdjoint`, `LinearRecurrenceProblem`).

    Attributes:
        chunk: time steps per chunk of matrices (None: about 2^25 coefficients per chunk).
        capture_chunks: on CUDA, replay the scan of a small chunk (at most 2^21 coefficients)
            from a CUDA graph cached per shape: one launch instead of ~4 log2(chunk) kernels.

    Example:
        >>> sol = ffsolve.solve(LinearRecurrenceProblem(A, b), method="scan")
        >>> hs, info = ffsolve.backprop_through(cell, h0, xs, method="scan")
    """

    name: ClassVar[str] = "scan"
    # chunks of the scan are sized on the host from the problem's shapes: never captured
    # whole by the loop (`backprop_through` captures a scan backward; see `capture_chunks`)
    capturable: ClassVar[bool] = False
    direct: ClassVar[bool] = True  # one sweep is the solution: no iteration bookkeeping
    chunk: int | None = None
    capture_chunks: bool = True

    def validate(self, length: int, stopping: Any) -> None:
        if self.chunk is not None:
            check_int("chunk", self.chunk)
        if not isinstance(self.capture_chunks, bool):
            raise TypeError(f"capture_chunks must be True or False, got {self.capture_chunks!r}")

    def sweep(self, problem: Problem, state: State, window: Window, memory: Any) -> Tensor:
        rec = problem.linear_recurrence()
        if rec.b.shape != (state.B, state.T, state.F):
            raise ValueError(
                f"linear_recurrence() gave b {tuple(rec.b.shape)}, expected "
                f"{(state.B, state.T, state.F)}"
            )
        scan = functools.partial(affine_scan, chunk=self.chunk, capture=self.capture_chunks)
        return window.take(problem.solve_recurrence(rec, scan))

    def guaranteed(self, certified: Tensor, length: int) -> Tensor:
        return torch.full_like(certified, length)  # an exact solve certifies every position

    def default_max_iters(self, length: int) -> int:
        return 1
