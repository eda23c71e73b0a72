"""Back-propagation through time as a triangular system, solved by any core method.

A recurrence h_t = cell(h_{t-1}, x_t), t = 1..T, and a loss L(h_1, ..., h_T) give direct
gradients g_t = dL/dh_t (through whatever the loss reads) and the adjoints a_t (the total
dL/dh_t):

    a_T = g_T,    a_t = g_t + J_{t+1}^T a_{t+1},    J_{t+1} = d h_{t+1} / d h_t.

BPTT solves this backwards, one step at a time. It is lower-triangular in reversed time:
position s = T - t holds a_{T-s} and reads only position s - 1. A Jacobi sweep updates every
position at once with ONE vector-Jacobian product over all time steps: the cell is called
once on the stacked (h_{t-1}, x_t) of every step (a batch of B*T rows) and that graph is
reused by every sweep. The parameter, h_0 and x gradients are then one more batched VJP of
the same graph, given all the adjoints.

`ffsolve.backprop.backprop_through` wraps this in an autograd function: the forward pass is
the ordinary sequential loop; `.backward()` solves the adjoint system with the chosen method
and accumulates gradients into the cell's parameters, h_0 and xs exactly like autograd would.

Truncated budgets. Jacobi starts from zero adjoints, so after k iterations
a^k_t = sum_{j<k} J_{t+1}^T ... J_{t+j}^T g_{t+j}: each loss term is propagated back through at
most k - 1 transitions. The gradients of a budget of k are therefore exactly those of k-step
truncated BPTT (each h_tau's loss reaching the k steps tau-k+1..tau); the adjoints of the last
k time steps are exact, and when the Jacobians contract (norm <= rho < 1) the error of the
others decays like rho^k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ffsolve.problems.base import Problem
from ffsolve.problems.cells import vjp_operands

__all__ = ["RecurrenceAdjoint"]

#: A flat cell: (N, F) states and (N, *D) inputs -> (N, F) next states.
FlatCell = Callable[[Tensor, Tensor], Tensor]


class RecurrenceAdjoint(Problem):
    """The adjoint system of BPTT for a recurrence with a flat state, in reversed time.

    The state of the system is (B, T, F) with positions along dim 1: position s holds
    a_{T-s} = dL/dh_{T-s}, so `Solution.converged` is per batch item.

    Args:
        cell: flat cell, (N, F) states and (N, *D) inputs -> (N, F) next states; called with
            N = B*T rows at once, so rows must be independent (no batch statistics, no
            dropout: the cell is re-run here and must give the forward pass's values).
        h_prev: (B, T, F) the states h_0..h_{T-1} the forward pass fed to the cell.
        xs: (B, T, *D) the inputs x_1..x_T.
        grad_h: (B, T, F) the direct gradients g_1..g_T of the loss w.r.t. h_1..h_T.
        xs_grad: also differentiate w.r.t. xs in `input_grads`.
        chain: optional h_1..h_T, each (B, F), holding the autograd graph of the sequential
            forward pass (h_t computed from h_{t-1}); the sequential method back-propagates
            through it in one pass of autograd's engine, the ordinary BPTT. Recomputed from
            h_prev[:, 0] and xs when omitted.
        structure: the cell as the user gave it (e.g. `rnn.step` or an `nn.GRUCell`), when
            `cell` wraps it; default `cell`. A cell whose structure `ffsolve.problems.cells`
            knows gets a sweep with no autograd call (operands formed once; capturable).
        fast: use that structured sweep when available (False: always autograd).

    Example:
        >>> problem = RecurrenceAdjoint(cell, h_prev, xs, grad_h)
        >>> sol = ffsolve.solve(problem, method="jacobi")
        >>> dh0, dxs, dparams = problem.input_grads(sol.value, list(params))
    """

    def __init__(
        self,
        cell: FlatCell,
        h_prev: Tensor,
        xs: Tensor,
        grad_h: Tensor,
        *,
        xs_grad: bool = False,
        chain: Sequence[Tensor] | None = None,
        structure: Any = None,
        fast: bool = True,
    ) -> None:
        if h_prev.dim() != 3 or grad_h.shape != h_prev.shape:
            raise ValueError(
                f"h_prev and grad_h must both be (B, T, F); got {tuple(h_prev.shape)} and "
                f"{tuple(grad_h.shape)}"
            )
        if xs.dim() < 2 or xs.shape[:2] != h_prev.shape[:2]:
            raise ValueError(
                f"xs must be (B, T, ...) with (B, T) = {tuple(h_prev.shape[:2])}, "
                f"got {tuple(xs.shape)}"
            )
        B, T, F = h_prev.shape
        if T == 0:
            raise ValueError("the sequence is empty (T = 0)")
        self.cell = cell
        self.length = T
        self.dim = 1
        self.shape = (B, T, F)
        self._xs = xs
        self._h0 = h_prev[:, 0]
        self._g_nat = grad_h
        self._g = grad_h.flip(1)  # (B, T, F), reversed time: row s holds g_{T-s}
        self._chain = list(chain) if chain is not None else None
        self._xs_grad = xs_grad
        with torch.enable_grad():
            # the graph of every step at once, in reversed time: row b*T + s holds step T-s,
            # whose input state is h_{T-s-1} and output h_{T-s}
            self._hp = h_prev.detach().flip(1).reshape(B * T, F).requires_grad_()  # (B*T, F)
            xr = xs.detach().flip(1)
            self._xr = xr.reshape(B * T, *xs.shape[2:])  # (B*T, *D)
            if xs_grad:
                self._xr.requires_grad_()
            self._out = cell(self._hp, self._xr)  # (B*T, F)
        # J^T a for every row by elementwise products and one matmul, when the cell is known
        self._fast = vjp_operands(structure or cell, self._hp, self._xr) if fast else None
        self.capturable = self._fast is not None

    def initial(self) -> Tensor:
        return torch.zeros_like(self._g)

    def _vjp(self, adj: Tensor) -> Tensor:
        """Every J_t^T a_t at once: adj (B, T, F) reversed -> (B, T, F) whose row s is
        J_{T-s}^T a_{T-s} (one backward pass through the stored all-steps graph)."""
        if self._fast is not None:
            B, T, F = self.shape
            return self._fast(adj.reshape(B * T, F)).view(B, T, F)
        if not self._out.requires_grad:  # the cell ignores its state: no coupling in time
            return torch.zeros_like(adj)
        (u,) = torch.autograd.grad(
            self._out,
            self._hp,
            grad_outputs=adj.reshape(self._out.shape),
            retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros_like(adj) if u is None else u.view(self.shape)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        u = self._vjp(x)  # (B, T, F); row s feeds position s + 1
        out = self._g[:, start:stop].clone()  # (B, stop - start, F)
        lo = max(start, 1)
        out[:, lo - start :] += u[:, lo - 1 : stop - 1]
        return out

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        # Ordinary BPTT: autograd's engine walks the sequential chain once, step after step,
        # and yields every adjoint; the solver's loop then takes them one position at a time.
        adj = self.sequential_adjoints()

        def step(t: int) -> Tensor:
            return adj[:, t : t + 1]

        return step

    def sequential_adjoints(self) -> Tensor:
        """All adjoints by ordinary BPTT, (B, T, F) in reversed time (row s = a_{T-s})."""
        chain = self._chain if self._chain is not None else self._rebuild_chain()
        if not chain[-1].requires_grad:
            return self._g.clone()
        with torch.enable_grad():
            stacked = torch.stack(chain, dim=1)  # (B, T, F): one output, one seed
        grads = torch.autograd.grad(
            stacked, chain, grad_outputs=self._g_nat, retain_graph=True, allow_unused=True
        )
        grads = [g if g is not None else self._g_nat[:, t] for t, g in enumerate(grads)]
        return torch.stack(grads[::-1], dim=1)  # (B, T, F), reversed time

    def _rebuild_chain(self) -> list[Tensor]:
        with torch.enable_grad():
            h = self._h0.detach().requires_grad_()
            xs = self._xs.detach()
            chain = []
            for t in range(self.length):
                h = self.cell(h, xs[:, t])
                chain.append(h)
        return chain

    def input_grads(
        self, adjoints: Tensor, params: Sequence[Tensor] = ()
    ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
        """Gradients of the loss w.r.t. h_0, xs and `params`, given the adjoints.

        Args:
            adjoints: (B, T, F) in reversed time, e.g. a `Solution.value` of this problem.
            params: tensors the cell uses (its parameters); None for any it does not use.

        Returns:
            (dL/dh_0 (B, F), dL/dxs (B, T, *D) or None unless `xs_grad`, [dL/dp for params]).
        """
        B, T, F = self.shape
        inputs = [self._hp, *([self._xr] if self._xs_grad else []), *params]
        if not self._out.requires_grad:
            grads: Sequence[Tensor | None] = [None] * len(inputs)
        else:
            grads = torch.autograd.grad(
                self._out,
                inputs,
                grad_outputs=adjoints.reshape(self._out.shape),
                allow_unused=True,
            )
        dhp = grads[0]
        dh0 = self._h0.new_zeros(B, F) if dhp is None else dhp.view(B, T, F)[:, T - 1]
        dxs = None
        if self._xs_grad:
            d = grads[1]
            dxs = torch.zeros_like(self._xs) if d is None else d.view(self._xs.shape).flip(1)
        return dh0, dxs, list(grads[1 + int(self._xs_grad) :])
