"""One solve across the ranks of a process group: each sweep's positions split over them.

`Sharded(problem)` is the same triangular system with its sweeps spread over the ranks of a
`torch.distributed` process group (NCCL on GPUs, gloo on CPUs; started by `torchrun`, or any
group the caller made). Every rank holds the whole iterate and runs the same solve; a sweep
over positions [s, e) is cut into one contiguous slice per rank, each rank evaluates its own
slice, and one all-gather gives every rank the whole sweep. The solver never knows: the loop,
the certificate, the window, the method's memory and every decision run identically on every
rank (the same values everywhere), so they need no collective of their own, and the answer is
the single-process one: bitwise where a slice runs the same kernels as the whole sweep (a
model evaluated once over every position and narrowed, as MADE's is), to rounding where the
shapes differ (a sampler's batched denoiser on fewer images).

What is sharded: `evaluate` and `evaluate_window`, hence `jacobi`, `gs_jacobi`, `picard` and
`anderson` (with or without a window; the prefix combination of Picard and the Gram sums of
Anderson run on every rank over the gathered values: cheap beside the model) and `jacobi_gs`
through the generic `evaluate_at`; and the linear solve of `scan`, `newton` and
`quasi_newton` (`solve_recurrence`): each rank scans its own contiguous positions from a zero
state, forming only their coefficients (Newton: only their Jacobians; its F(x) is a sharded
sweep), one all-gather of the slices' affine maps (a (B, F, F) product, or (B, F) diagonal,
and a (B, F) offset per rank) gives each rank the state entering its slice by a world-size
loop over the earlier maps, the slice is fixed up (x_t += A_t ... A_start h) and one
all-gather of the slices gives every rank the solution: the single-process scan's to
rounding (another order of the same sums; a few ulps of the solution's scale a position in
`tests/solvers/test_sharded.py`). Dense, diagonal and matvec coefficients (a matvec made dense
by the scan, as everywhere) are all combined. A slice longer than one chunk of matrices is
scanned twice (the second time from its entering state; its coefficients formed again), so
memory stays one chunk. Not sharded: `sequential` (one rank's worth of work on every rank,
the reference).

Example (run with `torchrun --nproc-per-node 2 script.py`):
    >>> torch.distributed.init_process_group("gloo")
    >>> sol = ffsolve.solve(Sharded(problem), method="picard", window=64)
    >>> sol = ffsolve.solve(Sharded(RecurrenceForward(cell, h0, xs)), method="newton")
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ffsolve.problems.base import LinearRecurrence, Problem

__all__ = ["Sharded", "shard_bounds"]


def shard_bounds(width: int, world: int, rank: int) -> tuple[int, int, int]:
    """The slice of `width` positions that rank `rank` of `world` evaluates, as (start of its
    slice, offset of its own positions in the slice, how many it owns), relative to the
    sweep's first position. Every rank evaluates `ceil(width / world)` positions (static
    shapes, equal pieces for the all-gather); the last ranks' slices are shifted back to stay
    inside the sweep, and a rank owns only the positions no earlier rank owns."""
    chunk = -(-width // world)
    own_start = min(rank * chunk, width)
    own_stop = min((rank + 1) * chunk, width)
    start = min(own_start, width - chunk)
    return start, own_start - start, own_stop - own_start


class Sharded(Problem):
    """`problem` with each sweep's positions split over the ranks of `group` (module doc).

    Args:
        problem: any problem; every rank builds the same one (same model, inputs, noise).
        group: a process group (default: the global one, which must be initialised).
    """

    def __init__(self, problem: Problem, group: Any = None) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a Problem, got {type(problem).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Sharded needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        self.problem, self.group = problem, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.length, self.dim = problem.length, problem.dim
        self.first_order = problem.first_order
        self.window_on_device = problem.window_on_device
        # a collective inside a captured graph is the caller's call (capture=True, NCCL)
        self.capturable = False
        self.capturable_stepper = problem.capturable_stepper

    # --- the sharded sweeps --------------------------------------------------------------
    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self._gather(lambda s, n: self.problem.evaluate(x, start + s, start + s + n),
                            stop - start)  # fmt: skip

    def evaluate_window(self, x: Tensor, start: Tensor, width: int) -> Tensor:
        return self._gather(lambda s, n: self.problem.evaluate_window(x, start + s, n), width)

    def _gather(self, part: Callable[[int, int], Tensor], width: int) -> Tensor:
        """Every rank's slice of a sweep of `width` positions, gathered in order."""
        if self.world == 1:
            return part(0, width)
        chunk = -(-width // self.world)
        start, _, _ = shard_bounds(width, self.world, self.rank)
        piece = part(start, chunk).contiguous()  # positions along dim, `chunk` of them
        pieces = [torch.empty_like(piece) for _ in range(self.world)]
        dist.all_gather(pieces, piece, group=self.group)
        owned = []
        for r, got in enumerate(pieces):
            _, offset, n = shard_bounds(width, self.world, r)
            if n:
                owned.append(got.narrow(self.dim, offset, n))
        return torch.cat(owned, dim=self.dim)

    # --- everything else is the problem's own ---------------------------------------------
    def initial(self) -> Tensor:
        return self.problem.initial()

    def prepare(self) -> None:
        self.problem.prepare()

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        return self.problem.stepper(x)

    @property
    def num_evals_per_step(self) -> int:
        return self.problem.num_evals_per_step

    def linear_recurrence(self) -> LinearRecurrence:
        return self.problem.linear_recurrence()

    def linear_part(self, start: int, stop: int) -> Tensor | None:
        return self.problem.linear_part(start, stop)

    def noise_variance(self) -> Tensor:
        return self.problem.noise_variance()

    def guess(self, x: Tensor, window: Any, certified: Tensor) -> Tensor | None:
        return self.problem.guess(x, window, certified)

    def tune_key(self) -> Hashable:
        return ("sharded", self.world, self.problem.tune_key())

    def jacobians(self, x: Tensor, start: int, stop: int, diagonal: bool = False) -> Tensor:
        # local, no collective: the Newton methods ask only for a rank's own slice (through
        # `solve_recurrence`); any other caller gets the positions it asked for, on every rank
        return self.problem.jacobians(x, start, stop, diagonal)

    # --- the sharded linear solve of scan and newton --------------------------------------
    def solve_recurrence(self, rec: LinearRecurrence, scan: Callable[..., Tensor]) -> Tensor:
        """Each rank scans its own positions from a zero state (forming only their
        coefficients), one all-gather of the slices' affine maps gives each rank the state
        entering its slice (combined over the earlier ranks in order, world size steps), the
        slice is fixed up, and one all-gather of the slices gives every rank the solution."""
        if self.world == 1:
            return self.problem.solve_recurrence(rec, scan)
        B, T, F = rec.b.shape
        chunk = -(-T // self.world)
        start, offset, n = shard_bounds(T, self.world, self.rank)
        lo = start + offset  # the rank's own positions: [lo, lo + n)

        def exchange(P: Tensor, y: Tensor) -> Tensor:
            """The state entering this rank's slice: h_0 = 0, h_{r+1} = P_r h_r + y_r."""
            mine = torch.cat([P.reshape(B, -1), y], dim=1).contiguous()  # (B, F*F + F) or 2F
            maps = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(maps, mine, group=self.group)
            h = torch.zeros_like(y)  # (B, F)
            for got in maps[: self.rank]:
                P_r, y_r = got[:, :-F].view(P.shape), got[:, -F:]
                h = (P_r * h if P_r.dim() == 2 else (P_r @ h[..., None])[..., 0]) + y_r
            return h

        part = scan(rec, start=lo, stop=lo + n, exchange=exchange)  # (B, n, F)
        if n < chunk:  # equal pieces for the all-gather
            part = torch.cat([part, part.new_zeros(B, chunk - n, F)], dim=1)
        pieces = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(pieces, part.contiguous(), group=self.group)
        owned = [got[:, : shard_bounds(T, self.world, r)[2]] for r, got in enumerate(pieces)]
        return torch.cat(owned, dim=1)  # (B, T, F)
