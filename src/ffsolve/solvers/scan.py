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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve import graphs
from ffsolve.problems.base import LinearRecurrence, Problem, check_finite
from ffsolve.solvers.base import Solver, State, Window, check_int

__all__ = ["Scan", "affine_scan", "linear_scan", "auto_chunk", "clear_graphs"]

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


def _scan_chunk(A: Tensor, b: Tensor, diagonal: bool) -> Tensor:
    """Inclusive Hillis-Steele scan: x_t = A_t x_{t-1} + b_t with x_{-1} = 0 on one chunk.

    Time-major inside (a free view for B = 1), so every shifted slice is one contiguous
    batch of matrices: a level is one fused multiply-add for b and one product for A.

    Args:
        A: (B, n, F, F) or (B, n, F) when diagonal.
        b: (B, n, F).

    Returns:
        (B, n, F).
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
        if 2 * off < n:  # the last step needs no products of matrices
            AA = A[off:] * A[:-off] if diagonal else torch.matmul(A[off:], A[:-off])
            A = torch.cat([A[:off], AA])
        off *= 2
    return b.transpose(0, 1)


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


def affine_scan(
    rec: LinearRecurrence,
    *,
    chunk: int | None = None,
    h0: Tensor | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    capture: bool = False,
) -> Tensor:
    """x_t = A_t x_{t-1} + b_t for t = 0..T-1, x_{-1} = h0 (or 0), by chunked scans.

    Args:
        rec: the recurrence (b and a chunk-wise source of the A_t).
        chunk: time steps per chunk (None: `auto_chunk`).
        h0: (B, F) the state before position 0; None for zero.
        transform: applied to each chunk's coefficients before use (e.g. a damping factor).
        capture: replay small CUDA chunks from cached CUDA graphs (see the module docstring).

    Returns:
        (B, T, F).
    """
    b = rec.b
    B, T, F = b.shape
    diagonal = rec.kind == "diagonal"
    chunk = chunk or auto_chunk(B, T, F, rec.kind)
    out = None if chunk >= T else torch.empty_like(b)  # one chunk: its scan is the answer
    carry = h0
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        A = rec.coeffs(s, e)
        if rec.kind == "matvec":
            A = _dense_of(A, B, e - s, F, b)  # type: ignore[arg-type]
        if transform is not None:
            A = transform(A)
        bb = b[:, s:e]
        if carry is not None:  # fold the state entering the chunk into its first offset
            bb = torch.cat([bb[:, :1] + _apply(A[:, 0], carry, diagonal)[:, None], bb[:, 1:]], 1)
        if capture and _graphable(A, bb):
            x = _scan_chunk_graphed(A, bb, diagonal)  # (B, e - s, F)
        else:
            x = _scan_chunk(A, bb, diagonal)
        if out is None:
            return x.contiguous()
        out[:, s:e] = x
        carry = x[:, -1]
    assert out is not None  # more than one chunk
    return out


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
        return window.take(affine_scan(rec, chunk=self.chunk, capture=self.capture_chunks))

    def guaranteed(self, certified: Tensor, length: int) -> Tensor:
        return torch.full_like(certified, length)  # an exact solve certifies every position

    def default_max_iters(self, length: int) -> int:
        return 1
