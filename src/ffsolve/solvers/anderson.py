"""anderson: triangular Anderson acceleration of the Jacobi map (ParaTAA, Tang et al. 2024).

Jacobi iterates x <- F(x). Anderson acceleration mixes the last m iterates: with residuals
R = F(x) - x and the differences of the last m iterates and of their images, dX and dF
(dR = dF - dX), it takes x_new = F(x) - dF gamma, gamma = argmin ||R - dR gamma||. A single
gamma couples every position with every other, later ones included, which breaks the
triangular structure (and the bound of T sweeps). The triangular version fits one gamma per
position t from the positions up to t only,

    gamma_t = argmin_g  sum_{s <= t} ||R_s - dR_s g||^2 + lam ||g||^2,

solved for every t at once from prefix sums of the small Gram matrices dR_s^T dR_s (m x m)
and dR_s^T R_s; x_new_t = F_t(x) - dF_t gamma_t. Where the residual of a prefix is exactly
zero, its gamma is exactly zero and the update is F(x) there.

Certificate: the update is not the base map G(x) in general, so the loop certifies on G's
residual (`residual_certificate`): the prefix where G(x) = x, plus one position, takes G(x)
and is final (G is Jacobi's map F, or Picard's update, which equals F on a zero-residual
prefix and at its first nonzero residual). Anderson therefore needs at most T sweeps, like
Jacobi, and returns the same fixed point; the history only changes how fast the uncertified
part approaches it. Safeguard (`fallback`, `guard`, as in `picard`): a position whose mixed
update is not finite or above guard * (max|G(x)| + 1) takes G(x), and with base='picard' one
whose Picard update is takes F(x) (G stays a map equal to F on a zero-residual prefix and at
its first nonzero residual, so the certificate holds); counted in
`stats["anderson_fallbacks"]`. With a tolerance, Picard's residual is the accumulated one,
the change a Picard sweep would make: the rule ParaDiGMS stops on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.solvers.base import Solver, State, check_int
from ffsolve.solvers.picard import check_guard, guarded, window_region
from ffsolve.solvers.record import Solution

__all__ = ["Anderson"]


@dataclass
class _History:
    """The last `m` iterates' differences over every position (ring buffers) and the
    previous iterate and image, per solve."""

    dX: Tensor  # (m, B, T, F)
    dF: Tensor  # (m, B, T, F)
    x: Tensor  # (B, T, F) the previous iterate
    fx: Tensor  # (B, T, F) its image F(x)
    seen: Tensor  # (B, T) bool: positions with a previous iterate (swept before)
    fallbacks: Tensor  # (B,) long: positions that took the base map's step (the safeguard)
    count: int = 0  # sweeps made (the ring's write index is count % m)


@dataclass(frozen=True)
class Anderson(Solver):
    """Triangular Anderson acceleration: x_new_t = F_t(x) - dF_t gamma_t (module doc).

    Attributes:
        history: m, the iterates mixed (1 or more; ParaTAA recommends 2 to 5).
        regularization: lam relative to the mean diagonal of each Gram matrix.
        window: positions per sweep, sliding over the certified prefix; None: all.
        base: the map accelerated: "jacobi" (x <- F(x)) or "picard" (x <- the Picard update
            with the identity as linear part, which the `picard` method iterates alone; for
            samplers whose steps stay near the identity, ParaTAA's setting).
        fallback, guard: the safeguard (module doc).

    Example:
        >>> sol = ffsolve.solve(problem, method="anderson", history=3)
    """

    name: ClassVar[str] = "anderson"
    nonfinite_hint: ClassVar[str] = (
        "with fallback=False the mixing or Picard's map (base='picard') may diverge on "
        "strongly coupled systems: the default fallback, a window (e.g. window=16), "
        "base='jacobi' or jacobi avoid it; with the fallback on, the problem's own step "
        "returned NaN or Inf"
    )
    capturable: ClassVar[bool] = False  # the history's ring index is a host counter
    residual_certificate: ClassVar[bool] = True
    history: int = 3
    regularization: float = 1e-8
    window: int | None = None
    base: str = "jacobi"
    fallback: bool = True
    guard: float = 10.0

    def validate(self, length: int, stopping: Any) -> None:
        check_int("history", self.history)
        if self.window is not None:
            check_int("window", self.window)
        if not self.regularization >= 0:  # NaN fails too
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        if self.base not in ("jacobi", "picard"):
            raise ValueError(f"base must be 'jacobi' or 'picard', got {self.base!r}")
        check_guard(self.guard)

    def static_region(self) -> bool:
        return self.window is None

    def region(self, certified: int, length: int) -> tuple[int, int]:
        return window_region(self.window, certified, length)

    def init(self, problem: Problem, state: State) -> _History:
        v = state.v
        m = self.history
        z = v.new_zeros(m, *v.shape)
        seen = torch.zeros(v.shape[:2], dtype=torch.bool, device=v.device)
        fallbacks = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
        return _History(z, z.clone(), v.clone(), v.clone(), seen, fallbacks)

    def sweep(
        self, problem: Problem, state: State, start: int, stop: int, memory: Any
    ) -> tuple[Tensor, Tensor]:
        h: _History = memory
        x = state.v[:, start:stop]  # (B, n, F)
        fx = state.flat(problem.evaluate(state.x, start, stop))  # (B, n, F): Jacobi's map
        # the map accelerated: Jacobi's, or Picard's (its linear part, the identity, solved
        # by a cumulative sum: the same fixed point, faster where the steps are near x)
        gx = fx if self.base == "jacobi" else fx + (torch.cumsum(fx - x, dim=1) - (fx - x))
        if self.base == "picard" and self.fallback:  # Picard's safeguard (its module doc)
            gx, bad = guarded(gx, fx, self.guard)
            h.fallbacks.add_(bad.sum(1))
        r = gx - x  # (B, n, F)
        m = self.history
        # the newest differences, where the position was swept before (else zero)
        seen = h.seen[:, start:stop, None]  # (B, n, 1)
        slot = h.count % m
        h.dX[slot, :, start:stop] = torch.where(seen, x - h.x[:, start:stop], 0.0)
        h.dF[slot, :, start:stop] = torch.where(seen, gx - h.fx[:, start:stop], 0.0)
        h.x[:, start:stop] = x
        h.fx[:, start:stop] = gx
        h.seen[:, start:stop] = True
        h.count += 1
        dX = h.dX[:, :, start:stop].permute(1, 2, 3, 0)  # (B, n, F, m)
        dF = h.dF[:, :, start:stop].permute(1, 2, 3, 0)
        # the small least-squares problems in float32 at least (half precision has no solve
        # on the CPU, and too few bits for normal equations anyway)
        acc = torch.promote_types(r.dtype, torch.float32)
        dR = (dF - dX).to(acc)  # (B, n, F, m)
        # prefix sums over positions of the per-position normal equations (triangular)
        gram = torch.cumsum(dR.transpose(2, 3) @ dR, dim=1)  # (B, n, m, m)
        rhs = torch.cumsum((dR.transpose(2, 3) @ r.to(acc)[..., None])[..., 0], dim=1)
        tiny = torch.finfo(acc).tiny
        scale = gram.diagonal(dim1=2, dim2=3).mean(-1).clamp_min(tiny)
        eye = torch.eye(m, dtype=acc, device=r.device)
        lam = (self.regularization * scale + tiny)[..., None, None]
        # zero rhs (a zero-residual prefix) gives exactly zero coefficients: F(x) there
        # solve_ex: no error (and no host sync) where a matrix is singular, only its info
        gamma, info = torch.linalg.solve_ex(gram + lam * eye, rhs[..., None])  # (B, n, m, 1)
        # no history yet (a zero Gram matrix), or a degenerate one: the base map's step there
        ok = (scale > tiny)[..., None, None] & (info == 0)[..., None, None] & gamma.isfinite()
        gamma = torch.where(ok, gamma, 0.0)
        new = gx - (dF.to(acc) @ gamma)[..., 0].to(gx.dtype)  # (B, n, F)
        if self.fallback:  # a mixed step far outside the base map's scale: the base step
            new, bad = guarded(new, gx, self.guard)
            h.fallbacks.add_(bad.sum(1))
        return new, gx

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """`stats["anderson_fallbacks"]`: positions per item that took the base map's step
        instead of the mixed one, or Jacobi's instead of Picard's (the safeguard)."""
        stats = {**solution.stats, "anderson_fallbacks": memory.fallbacks.tolist()}
        return dataclasses.replace(solution, stats=stats)
