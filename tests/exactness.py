"""What the exactness tests compare, and how closely (docs/design.md, "Exact, on real hardware").

A parallel solve certifies the fixed point of the *parallel evaluation*: the problem's
`evaluate` on the whole sequence, x = F(x). Where a test has that evaluation on the same
shapes (`parallel_fixed_point`, or another method sweeping with the same `evaluate`), it
compares bitwise. The sequential loop of a problem with its own `stepper` (a recurrence's B
rows one step at a time, a cache, an incremental update) calls the model on other shapes, and
the BLAS or a vectorised activation may round those differently: which shapes agree bitwise
depends on the CPU and the library build (a 2-core Xeon with MKL disagrees where this machine
agrees; `MKL_CBWR=COMPATIBLE` disagrees here). Against that loop a test asserts closeness
within `sequential_tolerance`.

The bound, atol = rtol = ULPS_PER_STEP * eps(dtype) * length: the two evaluations of one step
may differ by a few ulps (a dot product of K terms summed in another order differs by at most
about 2 K ulps of its terms' magnitudes, an activation by one or two); the tests' models are
small (K <= 8, hidden 6 plus 2 inputs, or a few dozen units with most of the sum from a few
terms) and not expanding, so one step's difference is at most carried forward, not amplified:
after `length` steps at most `length` times a step's. 16 ulps per step covers that with room,
and stays far below any real error: a position one iteration short of final, a stale state or
a wrong certificate moves a value by about 1e-3 or more, which the bound (8e-14 for 23 float64
steps) rejects by ten orders of magnitude. Expanding systems (|J| > 1) amplify rounding and
need their own, stated bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: ulps one step of the parallel evaluation may differ from the sequential step by (module doc)
ULPS_PER_STEP = 16


def sequential_tolerance(dtype: torch.dtype, length: int, ulps: int = ULPS_PER_STEP) -> float:
    """atol = rtol for comparing a parallel solve of `length` positions with the sequential
    loop: `ulps` * eps(dtype) per step, accumulated over the steps (module doc)."""
    return ulps * torch.finfo(dtype).eps * length


def assert_close_to_sequential(
    value: Tensor, seq: Tensor, length: int, ulps: int = ULPS_PER_STEP
) -> None:
    """value equals the sequential loop's `seq` to rounding: |value - seq| <= tol (1 + |seq|)
    with tol = `sequential_tolerance` (not bitwise: the loop runs other shapes)."""
    tol = sequential_tolerance(seq.dtype, length, ulps)
    torch.testing.assert_close(value, seq, atol=tol, rtol=tol)


def parallel_fixed_point(problem) -> Tensor:
    """The fixed point x = F(x) of the parallel evaluation F = `problem.evaluate(., 0, T)`,
    independent of any solver: T applications from `problem.initial()` (position t is final
    after t + 1 of them, since f_t reads positions < t only), checked to be a fixed point
    bitwise. The reference a certificate proves, for methods that sweep the whole sequence."""
    T = problem.length
    with torch.no_grad():
        problem.prepare()
        x = problem.initial().clone()
        for _ in range(T):
            x = problem.evaluate(x, 0, T)
        assert torch.equal(problem.evaluate(x, 0, T), x), "not a fixed point after T sweeps"
    return x
