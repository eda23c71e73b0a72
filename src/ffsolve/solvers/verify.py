"""`verify`: check a solution against the sequential loop at a few positions, and the system's
causality, at the cost of a few evaluations.

Every method returns the sequential answer only if f_t reads positions < t alone. A function
that also reads later positions is not a triangular system: Jacobi then "converges" to a fixed
point that the sequential loop does not compute, and nothing in an iteration can tell. Two
cheap checks can:

- fixed point: at sampled positions t, f_t of the solution equals its x_t (what the
  sequential loop computes from the same x_<t), within ten times the tolerance for a
  tolerance solve, plus one step's rounding: f_t is evaluated one position at a time, and
  where that runs other shapes than the solve's sweep (a recurrence's cell on B rows instead
  of B*T) the BLAS may round it differently on some CPUs and builds (docs/design.md,
  "Exactness on real hardware"). That allowance is `ROUNDING` ulps of max(|f_t|, 1) in the
  state's dtype: an exact solve off by rounding is not reported, a wrong one (a non-causal
  function's fixed point, a stale state) is off by far more;
- causality: positions >= p of the solution replaced by other values change no output at a
  position <= p (f_t reads positions < t only), for a few sampled p.

Example:
    >>> report = ffsolve.verify(problem, sol.value)
    >>> report.ok, report.findings
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ffsolve.problems.base import Problem, canonical_shape

__all__ = ["ROUNDING", "Verification", "VerificationWarning", "verify"]

#: one step's rounding allowed at a checked position, in ulps of max(|f_t(x)|, 1)
ROUNDING = 64


class VerificationWarning(RuntimeWarning):
    """`solve(..., verify=True)` found the solution or the system wrong (see the findings)."""


@dataclass(frozen=True)
class Verification:
    """What `verify` found.

    Attributes:
        positions: the positions checked.
        max_residual: max |f_t(x) - x_t| over them.
        fixed_point: every checked position is what the sequential loop computes.
        causal: no output at a position <= p moved when positions >= p were replaced.
        findings: one line per problem found (empty when `ok`).
    """

    positions: list[int]
    max_residual: float
    fixed_point: bool
    causal: bool
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fixed_point and self.causal


def verify(
    problem: Problem,
    value: Tensor,
    *,
    positions: int = 8,
    atol: float = 0.0,
    rtol: float = 0.0,
    seed: int = 0,
) -> Verification:
    """Check `value` (a solution of `problem`) at `positions` sampled positions (always the
    first and the last) and the causality of the problem's function at a few of them.

    Args:
        problem: the system solved.
        value: its solution, shaped like `problem.initial()`.
        positions: how many positions to check.
        atol, rtol: the tolerance the solve used (0: the fixed point must hold to one
            step's rounding, `ROUNDING` ulps).
        seed: which positions are sampled.
    """
    T, d = problem.length, problem.dim
    if value.shape != problem.initial().shape:
        raise ValueError(
            f"value has shape {tuple(value.shape)}, the problem's state "
            f"{tuple(problem.initial().shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    picks = sorted({0, T - 1, *torch.randint(T, (max(0, positions - 2),), generator=g).tolist()})
    B, _, F = canonical_shape(value.shape, d)
    v = value.detach().reshape(B, T, F)
    findings: list[str] = []
    worst = 0.0
    with torch.no_grad():
        problem.prepare()
        for t in picks:
            new = problem.evaluate(value, t, t + 1).reshape(B, F)
            gap = (new.double() - v[:, t].double()).abs()
            worst = max(worst, float(gap.max()))
            ulp = torch.finfo(new.dtype).eps if new.dtype.is_floating_point else 0.0
            rounding = ROUNDING * ulp * new.double().abs().clamp(min=1.0)
            tol = 10 * (atol + rtol * new.double().abs()) + rounding
            if bool((gap > tol).any()):
                findings.append(
                    f"position {t}: f_t(x) differs from x_t by {float(gap.max()):.3g} (the "
                    "sequential loop would compute another value here)"
                )
        for p in [q for q in picks if 0 < q < T][:3]:
            base = problem.evaluate(value, 0, p + 1).reshape(B, p + 1, F)
            other = v.clone()
            noise = torch.randn(other[:, p:].shape, generator=g, dtype=torch.float64)
            other[:, p:] += (1.0 + other[:, p:].abs()) * noise.to(other)
            moved = problem.evaluate(other.reshape(value.shape), 0, p + 1).reshape(B, p + 1, F)
            changed = (moved != base).any(2).any(0)  # (p + 1,)
            if bool(changed.any()):
                t = int(changed.int().argmax())
                findings.append(
                    f"not causal: the output at position {t} changed when positions >= {p} "
                    "did (f_t may read positions < t only)"
                )
    fixed = not any(f.startswith("position") for f in findings)
    causal = not any(f.startswith("not causal") for f in findings)
    return Verification(picks, worst, fixed, causal, findings)
