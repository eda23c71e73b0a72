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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import linear as F_linear

from ffsolve.problems.base import LinearRecurrence, Problem, _rows_by_vjp
from ffsolve.problems.cells import known, vjp_operands

__all__ = [
    "RecurrenceAdjoint",
    "RecurrenceForward",
    "StateLayout",
    "flat_cell",
    "torch_cell_jacobian",
]

#: A recurrent state: one tensor (B, *shape) or a tuple of them (e.g. an LSTM's (h, c)).
State = Tensor | tuple[Tensor, ...]

#: A flat cell: (N, F) states and (N, *D) inputs -> (N, F) next states.
FlatCell = Callable[[Tensor, Tensor], Tensor]


class StateLayout:
    """How a state (a tensor or a tuple of tensors, each (B, *shape)) maps to one (B, F).

    Shared by `backprop_through` and `RecurrenceForward`: an LSTM's (h, c) is flattened to
    one (B, 2H) state, h then c."""

    def __init__(self, parts: Sequence[Tensor], is_tuple: bool) -> None:
        self.shapes = [tuple(p.shape[1:]) for p in parts]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.is_tuple = is_tuple
        self.dtype = parts[0].dtype
        self.features = sum(self.sizes)
        self.plain = not is_tuple and len(self.shapes[0]) == 1  # the state is already (B, F)

    def flatten(self, parts: Sequence[Tensor]) -> Tensor:
        n = parts[0].shape[0]
        flat = [p.reshape(n, -1) for p in parts]  # each (N, size_i)
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)  # (N, F)

    def unflatten(self, flat: Tensor) -> State:
        n = flat.shape[0]
        if not self.is_tuple:
            return flat.view(n, *self.shapes[0])  # (N, *shape)
        chunks = flat.split(self.sizes, dim=1)
        return tuple(c.reshape(n, *s) for c, s in zip(chunks, self.shapes, strict=True))

    def parts_of(self, out: Any, n: int) -> list[Tensor]:
        """The cell's output as a list of parts, checked against the state's structure."""
        if self.is_tuple:
            if not isinstance(out, tuple | list) or len(out) != len(self.shapes):
                raise TypeError(
                    f"the cell must return a tuple of {len(self.shapes)} tensors like h0, "
                    f"got {type(out).__name__}"
                )
            parts = list(out)
        else:
            if not isinstance(out, Tensor):
                raise TypeError(f"the cell must return a tensor like h0, got {type(out).__name__}")
            parts = [out]
        for i, (p, s) in enumerate(zip(parts, self.shapes, strict=True)):
            if not isinstance(p, Tensor) or tuple(p.shape) != (n, *s):
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                where = f" part {i}" if self.is_tuple else ""
                raise ValueError(
                    f"the cell changed the state's shape{where}: got {got}, expected {(n, *s)}"
                )
            if p.dtype != self.dtype:
                raise ValueError(f"the cell changed the state's dtype: {p.dtype} != {self.dtype}")
        return parts


def _cell_jacobians(cell: FlatCell, hp: Tensor, xr: Tensor, transpose: bool) -> Tensor:
    """d cell(h, x) / d h for every row: hp (N, F), xr (N, *D) -> (N, F, F) (transposed on
    request), by F batched vector-Jacobian products of one call on all rows."""
    with torch.enable_grad():
        h = hp.detach().requires_grad_()
        out = cell(h, xr.detach())  # (N, F)
    g = _rows_by_vjp(out, h, h.shape[1])  # (F, N, F): g[i, n, j] = d out[n, i] / d h[n, j]
    return g.permute(1, 2, 0) if transpose else g.permute(1, 0, 2)


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
        jacobian: optional closed-form `jacobian(h, x, diagonal)` of the flat cell (see
            `RecurrenceForward`), used by the scan and Newton methods; default: F batched
            vector-Jacobian products.
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
        jacobian: Callable[[Tensor, Tensor, bool], Tensor] | None = None,
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
        self._jacobian = jacobian
        # every step at once, in reversed time: row b*T + s holds step T-s, whose input state
        # is h_{T-s-1} and output h_{T-s}; its autograd graph is recorded at first need
        self._hp = h_prev.detach().flip(1).reshape(B * T, F)  # (B*T, F)
        self._xr = xs.detach().flip(1).reshape(B * T, *xs.shape[2:])  # (B*T, *D)
        self._out: Tensor | None = None
        # J^T a for every row by elementwise products and one matmul, when the cell is known;
        # the operands are formed at the first sweep (a scan never needs them)
        self._structure = structure or cell
        self.capturable = fast and known(self._structure)
        self._fast: Callable[[Tensor], Tensor] | None = None

    def initial(self) -> Tensor:
        return torch.zeros_like(self._g)

    def _vjp(self, adj: Tensor) -> Tensor:
        """Every J_t^T a_t at once: adj (B, T, F) reversed -> (B, T, F) whose row s is
        J_{T-s}^T a_{T-s} (one backward pass through the stored all-steps graph)."""
        if self.capturable:
            if self._fast is None:
                self._fast = vjp_operands(self._structure, self._hp, self._xr)
                assert self._fast is not None  # `known` said so
            B, T, F = self.shape
            return self._fast(adj.reshape(B * T, F)).view(B, T, F)
        out = self._recorded()
        if not out.requires_grad:  # the cell ignores its state: no coupling in time
            return torch.zeros_like(adj)
        (u,) = torch.autograd.grad(
            out,
            self._hp,
            grad_outputs=adj.reshape(out.shape),
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

    first_order = True  # position s reads position s - 1 only

    def jacobians(self, x: Tensor, start: int, stop: int, diagonal: bool = False) -> Tensor:
        """A_s = J_{T-s+1}^T for s in [start, stop) (A_0 = 0): (B, n, F, F), or the diagonals.

        Formed from F batched vector-Jacobian products of the cell on the chunk's rows (row
        s - 1 of the reversed-time graph is step T - s + 1), so one chunk of matrices at a time.
        """
        B, T, F = self.shape
        lo = max(start, 1)
        n = stop - lo
        parts = []
        if start == 0:
            parts.append(x.new_zeros(B, 1, F, F))
        if n > 0:
            hp = self._hp.detach().view(B, T, F)[:, lo - 1 : stop - 1].reshape(B * n, F)
            xr = self._xr.detach().view(B, T, *self._xs.shape[2:])[:, lo - 1 : stop - 1]
            xr = xr.reshape(B * n, *xr.shape[2:])
            if self._jacobian is not None:
                with torch.no_grad():
                    A = self._jacobian(hp, xr, False).transpose(1, 2)  # (B*n, F, F)
            else:
                A = _cell_jacobians(self.cell, hp, xr, True)
            parts.append(A.reshape(B, n, F, F))
        A = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, stop - start, F, F)
        return A.diagonal(dim1=2, dim2=3) if diagonal else A

    def linear_recurrence(self) -> LinearRecurrence:
        """a_{T-s} = J_{T-s+1}^T a_{T-s+1} + g_{T-s}: position s reads s - 1 linearly."""
        return LinearRecurrence(self._g, lambda s, e: self.jacobians(self._g, s, e), "dense")

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

    def rerecord(self) -> Tensor:
        """Record the all-steps graph (the cell on every row at once) from the current rows,
        anew: after a CUDA graph replay rewrote them, since autograd refuses a graph recorded
        before an in-place update of the cell's parameters, such as an optimizer step."""
        with torch.enable_grad():
            self._hp = self._hp.detach().requires_grad_()
            self._xr = self._xr.detach().requires_grad_(self._xs_grad)
            self._out = self.cell(self._hp, self._xr)  # (B*T, F)
        return self._out

    def _recorded(self) -> Tensor:
        return self._out if self._out is not None else self.rerecord()

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
        out = self._recorded()  # before the inputs: recording makes the rows leaves
        inputs = [self._hp, *([self._xr] if self._xs_grad else []), *params]
        if not out.requires_grad:
            grads: Sequence[Tensor | None] = [None] * len(inputs)
        else:
            grads = torch.autograd.grad(
                out, inputs, grad_outputs=adjoints.reshape(out.shape), allow_unused=True
            )
        dhp = grads[0]
        dh0 = self._h0.new_zeros(B, F) if dhp is None else dhp.view(B, T, F)[:, T - 1]
        dxs = None
        if self._xs_grad:
            d = grads[1]
            dxs = torch.zeros_like(self._xs) if d is None else d.view(self._xs.shape).flip(1)
        return dh0, dxs, list(grads[1 + int(self._xs_grad) :])


def flat_cell(cell: Callable[[State, Tensor], State], layout: StateLayout) -> FlatCell:
    """The cell on flat states, (N, F), (N, *D) -> (N, F), checked against the layout. A torch
    `RNNCell`, `GRUCell` or `LSTMCell` (which take (input, hidden)) is accepted as is."""
    user = (lambda h, x: cell(x, h)) if isinstance(cell, nn.RNNCellBase) else cell

    def call(h: Tensor, x: Tensor) -> Tensor:
        if layout.plain:
            out = user(h, x)
            if isinstance(out, Tensor) and out.shape == h.shape and out.dtype == h.dtype:
                return out
            layout.parts_of(out, h.shape[0])  # raises the precise error
        out = user(layout.unflatten(h), x)
        return layout.flatten(layout.parts_of(out, h.shape[0]))

    return call


class RecurrenceForward(Problem):
    """The hidden states of h_t = cell(h_{t-1}, x_t), t = 1..T, as a triangular system.

    Position t - 1 of the (B, T, F) state holds h_t (F: the state's features, an LSTM's h then
    c). f_t reads position t - 1 only (`first_order`), so every method applies: sequential,
    jacobi (one cell call on all B*T rows per sweep), newton and quasi_newton (DEER).

    Args:
        cell: `cell(h, x) -> h_next` with h (N, *S) or a tuple of such tensors, x (N, *D);
            rows must be independent (it is called on B*T rows at once). torch's `RNNCell`,
            `GRUCell`, `LSTMCell` are accepted as is.
        h0: (B, *S) or a tuple of them, the initial state.
        xs: (B, T, *D) the inputs x_1..x_T.
        jacobian: optional `jacobian(h, x, diagonal) -> (N, F, F)` or `(N, F)`, d cell / d h
            on flat states (N, F). Default: the closed form for torch's RNN/GRU/LSTM cells
            (`torch_cell_jacobian`), else F batched vector-Jacobian products of the cell.

    Example:
        >>> problem = RecurrenceForward(torch.nn.GRUCell(2, 16), torch.zeros(8, 16), xs)
        >>> hs = problem.states(ffsolve.solve(problem, method="newton").value)  # (8, T, 16)
    """

    first_order = True

    def __init__(
        self,
        cell: Callable[[State, Tensor], State],
        h0: State,
        xs: Tensor,
        *,
        jacobian: Callable[[Tensor, Tensor, bool], Tensor] | None = None,
    ) -> None:
        if not callable(cell):
            raise TypeError(f"cell must be callable, got {type(cell).__name__}")
        is_tuple = not isinstance(h0, Tensor)
        parts = list(h0) if is_tuple else [h0]
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError("h0 must be a tensor or a tuple of tensors")
        if not isinstance(xs, Tensor) or xs.dim() < 2:
            raise ValueError("xs must be a tensor (B, T, *D)")
        B, T = xs.shape[:2]
        if T == 0:
            raise ValueError("xs has no time steps (T = 0)")
        if any(p.shape[0] != B for p in parts):
            raise ValueError(f"h0 and xs disagree on the batch size ({parts[0].shape[0]} vs {B})")
        self.layout = StateLayout(parts, is_tuple)
        self.cell = flat_cell(cell, self.layout)
        self._jacobian = jacobian if jacobian is not None else torch_cell_jacobian(cell)
        self.h0 = self.layout.flatten([p.detach() for p in parts])  # (B, F)
        self.xs = xs.detach()
        self.length, self.dim = T, 1
        self.shape = (B, T, self.layout.features)

    def initial(self) -> Tensor:
        """h_0 repeated at every position: (B, T, F)."""
        return self.h0[:, None].expand(self.shape).clone()

    def _prev(self, x: Tensor, start: int, stop: int) -> Tensor:
        """h_{t-1} for positions [start, stop): (B, n, F)."""
        if start == 0:
            return torch.cat([self.h0[:, None], x[:, : stop - 1]], dim=1)
        return x[:, start - 1 : stop - 1]

    def _rows(self, start: int, stop: int) -> Tensor:
        xs = self.xs[:, start:stop]  # (B, n, *D)
        return xs.reshape(-1, *xs.shape[2:])  # (B*n, *D)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        B, _, F = self.shape
        hp = self._prev(x, start, stop).reshape(-1, F)  # (B*n, F)
        return self.cell(hp, self._rows(start, stop)).view(B, stop - start, F)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        def step(t: int) -> Tensor:
            h = self.h0 if t == 0 else x[:, t - 1]  # (B, F)
            return self.cell(h, self.xs[:, t])[:, None]  # (B, 1, F)

        return step

    def jacobians(self, x: Tensor, start: int, stop: int, diagonal: bool = False) -> Tensor:
        B, _, F = self.shape
        n = stop - start
        hp = self._prev(x, start, stop).reshape(B * n, F)
        rows = self._rows(start, stop)
        if self._jacobian is not None:
            J = self._jacobian(hp, rows, diagonal)
        else:
            J = _cell_jacobians(self.cell, hp, rows, False)  # (B*n, F, F)
            if diagonal:
                J = J.diagonal(dim1=1, dim2=2)
        J = J.reshape(B, n, *J.shape[1:])
        if start == 0:  # h_0 is fixed: position 0 has no predecessor in the system
            J = torch.cat([torch.zeros_like(J[:, :1]), J[:, 1:]], dim=1)
        return J

    def states(self, value: Tensor) -> State:
        """A solution's value (B, T, F) as hidden states (B, T, *S), a tuple for a tuple
        state (an LSTM's (h, c))."""
        B, T, F = self.shape
        out: Any = self.layout.unflatten(value.reshape(B * T, F))
        if isinstance(out, tuple):
            return tuple(p.view(B, T, *p.shape[1:]) for p in out)
        return out.view(B, T, *out.shape[1:])


def torch_cell_jacobian(cell: Any) -> Callable[[Tensor, Tensor, bool], Tensor] | None:
    """Closed-form d h_next / d h of torch's `RNNCell`, `GRUCell` and `LSTMCell` on flat states
    (an LSTM's (h, c) as [h, c]); of a model's bound `step` method when the model also offers
    `step_jacobian(h, x, diagonal)` (as `ffsolve.models.rnn.VanillaRNN` does); else None.

    Returns:
        `jacobian(h, x, diagonal)`: h (N, F), x (N, D) -> (N, F, F), or (N, F) when diagonal
        (only the diagonal is formed then: O(N F) memory, what quasi-Newton needs).
    """
    owner = getattr(cell, "__self__", None)
    if getattr(cell, "__name__", None) == "step" and callable(
        getattr(owner, "step_jacobian", None)
    ):
        return owner.step_jacobian  # a model's cell with its own closed form
    if isinstance(cell, nn.LSTMCell):
        return lambda h, x, diagonal: _lstm_jacobian(cell, h, x, diagonal)
    if isinstance(cell, nn.GRUCell):
        return lambda h, x, diagonal: _gru_jacobian(cell, h, x, diagonal)
    if isinstance(cell, nn.RNNCell):
        return lambda h, x, diagonal: _rnn_jacobian(cell, h, x, diagonal)
    return None


def _scaled(a: Tensor, W: Tensor, diagonal: bool) -> Tensor:
    """diag(a) W per row: a (N, H), W (H, H) -> (N, H, H), or its diagonal a * diag(W)."""
    return a * W.diagonal() if diagonal else a[:, :, None] * W


def _rnn_jacobian(cell: nn.RNNCell, h: Tensor, x: Tensor, diagonal: bool) -> Tensor:
    pre = F_linear(x, cell.weight_ih, cell.bias_ih) + F_linear(h, cell.weight_hh, cell.bias_hh)
    act = 1 - torch.tanh(pre) ** 2 if cell.nonlinearity == "tanh" else (pre > 0).to(pre.dtype)
    return _scaled(act, cell.weight_hh, diagonal)


def _gru_jacobian(cell: nn.GRUCell, h: Tensor, x: Tensor, diagonal: bool) -> Tensor:
    # torch's GRU: r, z = sigmoid(.), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    # h' = (1 - z) n + z h
    gi = F_linear(x, cell.weight_ih, cell.bias_ih).chunk(3, 1)  # each (N, H)
    gh = F_linear(h, cell.weight_hh, cell.bias_hh).chunk(3, 1)
    r = torch.sigmoid(gi[0] + gh[0])
    z = torch.sigmoid(gi[1] + gh[1])
    n = torch.tanh(gi[2] + r * gh[2])
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3, 0)  # each (H, H)
    dn = 1 - n * n
    J = (
        _scaled((1 - z) * dn * r, W_hn, diagonal)
        + _scaled((1 - z) * dn * gh[2] * r * (1 - r), W_hr, diagonal)
        + _scaled((h - n) * z * (1 - z), W_hz, diagonal)
    )
    return J + z if diagonal else J + torch.diag_embed(z)


def _lstm_jacobian(cell: nn.LSTMCell, hc: Tensor, x: Tensor, diagonal: bool) -> Tensor:
    # gates i, f, g, o; c' = f c + i g, h' = o tanh(c'); the flat state is [h, c]
    H = cell.hidden_size
    h, c = hc[:, :H], hc[:, H:]
    gates = F_linear(x, cell.weight_ih, cell.bias_ih) + F_linear(h, cell.weight_hh, cell.bias_hh)
    gi, gf, gg, go = gates.chunk(4, 1)
    i, f, g, o = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
    c2 = f * c + i * g
    tc = torch.tanh(c2)
    W_i, W_f, W_g, W_o = cell.weight_hh.chunk(4, 0)  # each (H, H)
    dc_dh = (
        _scaled(c * f * (1 - f), W_f, diagonal)
        + _scaled(g * i * (1 - i), W_i, diagonal)
        + _scaled(i * (1 - g * g), W_g, diagonal)
    )
    do = o * (1 - tc * tc)  # d h' / d c'
    dh_dh = _scaled(o * (1 - o) * tc, W_o, diagonal) + (
        do * dc_dh if diagonal else do[:, :, None] * dc_dh
    )
    if diagonal:
        return torch.cat([dh_dh, f], dim=1)  # (N, 2H)
    top = torch.cat([dh_dh, torch.diag_embed(do * f)], dim=2)  # (N, H, 2H)
    bottom = torch.cat([dc_dh, torch.diag_embed(f)], dim=2)
    return torch.cat([top, bottom], dim=1)  # (N, 2H, 2H)
