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
from ffsolve.solvers.base import Solver, State, Window, check_int, sliding_start
from ffsolve.solvers.picard import check_guard, guarded
from ffsolve.solvers.record import Solution

__all__ = ["Anderson"]


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

    def width(self, length: int) -> int:
        return length if self.window is None else min(self.window, length)

    def window_start(self, certified: Any, length: int) -> Any:
        return sliding_start(self.width(length), certified, length)

    def init(self, problem: Problem, state: State) -> dict[str, Tensor]:
        """The last m iterates' differences over every position (a ring of m slots whose
        write index is `count` mod m), the previous iterate and image, which positions have
        one, and the safeguard's count per item."""
        v = state.v  # (B, T, F)
        z = v.new_zeros(self.history, *v.shape)  # (m, B, T, F)
        return {
            "dX": z,
            "dF": z.clone(),
            "x": v.clone(),  # (B, T, F) the previous iterate
            "fx": v.clone(),  # (B, T, F) its image G(x)
            "seen": torch.zeros(v.shape[:2], dtype=torch.bool, device=v.device),  # (B, T)
            "fallbacks": torch.zeros(v.shape[0], dtype=torch.long, device=v.device),
            "count": torch.zeros((), dtype=torch.long, device=v.device),  # sweeps made
        }

    def sweep(
        self, problem: Problem, state: State, window: Window, memory: Any
    ) -> tuple[Tensor, Tensor]:
        h = memory
        x = window.take(state.v)  # (B, n, F)
        fx = state.flat(window.evaluate(problem, state.x))  # (B, n, F): Jacobi's map
        # the map accelerated: Jacobi's, or Picard's (its linear part, the identity, solved
        # by a cumulative sum: the same fixed point, faster where the steps are near x)
        gx = fx if self.base == "jacobi" else fx + (torch.cumsum(fx - x, dim=1) - (fx - x))
        fallbacks = h["fallbacks"]
        if self.base == "picard" and self.fallback:  # Picard's safeguard (its module doc)
            gx, bad = guarded(gx, fx, self.guard)
            fallbacks = fallbacks + bad.sum(1)
        r = gx - x  # (B, n, F)
        m = self.history
        # the newest differences, where the position was swept before (else zero), into the
        # ring's slot count mod m at the window's positions
        seen = window.take(h["seen"])[..., None]  # (B, n, 1)
        new_dX = torch.where(seen, x - window.take(h["x"]), 0.0)
        new_dF = torch.where(seen, gx - window.take(h["fx"]), 0.0)
        B, n = x.shape[:2]
        at = (
            (h["count"] % m).view(1, 1).expand(B, n),
            torch.arange(B, device=x.device)[:, None].expand(B, n),
            window.positions()[None, :].expand(B, n),
        )  # (slot, item, position) of every (B, n) entry
        h["dX"] = dXs = h["dX"].index_put(at, new_dX)
        h["dF"] = dFs = h["dF"].index_put(at, new_dF)
        h["x"] = window.put(h["x"], x)
        h["fx"] = window.put(h["fx"], gx)
        h["seen"] = window.put(h["seen"], torch.ones_like(seen[..., 0]))
        h["count"] = h["count"] + 1
        dX = window.take(dXs, 2).permute(1, 2, 3, 0)  # (B, n, F, m)
        dF = window.take(dFs, 2).permute(1, 2, 3, 0)
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
            fallbacks = fallbacks + bad.sum(1)
        h["fallbacks"] = fallbacks
        return new, gx

    def finish(self, solution: Solution, memory: Any) -> Solution:
        """`stats["anderson_fallbacks"]`: positions per item that took the base map's step
        instead of the mixed one, or Jacobi's instead of Picard's (the safeguard)."""
        stats = {**solution.stats, "anderson_fallbacks": memory["fallbacks"].tolist()}
        return dataclasses.replace(solution, stats=stats)
