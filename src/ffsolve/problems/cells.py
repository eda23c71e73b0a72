"""Vector-Jacobian products of recurrent cells, formed once and applied by a matrix product.

For a cell h' = cell(h, x), back-propagation needs J^T a with J = d h' / d h at every time
step. For the cells whose structure is known, J^T a is linear in a with operands that depend
only on the forward pass, so they are formed ONCE for all B*T rows and every later product is
a few elementwise operations plus one matrix product, with static shapes and no autograd
engine call (a sweep that a CUDA graph can capture):

    vanilla  h' = phi(W h + U x + b):          J^T a = W^T (phi'(pre) * a)
    RNNCell  same with tanh or relu
    GRUCell  h' = (1 - z) n + z h:             J^T a = z a + W_hh^T [dr, dz, dn * r]
    LSTMCell (h', c') from gates i, f, g, o:   J^T (a_h, a_c) = (W_hh^T dgates, f * dc')

(row-vector form: a (N, F) @ W (F_out, F_in)). `vjp_operands` is the one place that knows
cell structures; `RecurrenceAdjoint` (and any method that needs per-step Jacobian products)
uses it and falls back to autograd for any other cell.

Example:
    >>> vjp = vjp_operands(rnn.step, h_prev, xs)   # h_prev (N, F), xs (N, D)
    >>> u = vjp(a)                                  # (N, F): row n is J_n^T a_n
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.models.rnn import VanillaRNN

__all__ = ["StepVJP", "known", "vjp_operands"]

#: a -> J^T a for every row at once, (N, F) -> (N, F).
StepVJP = Callable[[Tensor], Tensor]


def _kind(cell: Any) -> str | None:
    """Which known structure `cell` has: "vanilla", "rnn", "gru", "lstm", or None."""
    if inspect.ismethod(cell) and isinstance(cell.__self__, VanillaRNN):
        return "vanilla" if cell.__func__ is VanillaRNN.step else None
    return {nn.RNNCell: "rnn", nn.GRUCell: "gru", nn.LSTMCell: "lstm"}.get(type(cell))


def known(cell: Any) -> bool:
    """True when `vjp_operands` knows the cell's structure (it then never returns None)."""
    return _kind(cell) is not None


def vjp_operands(cell: Any, h_prev: Tensor, xs: Tensor) -> StepVJP | None:
    """The per-step VJP of a known cell, its operands formed once; None for other cells.

    Args:
        cell: `VanillaRNN.step` (a bound method), or a torch `RNNCell`, `GRUCell` or
            `LSTMCell` (for an LSTM the state is flat: h then c, (N, 2H)).
        h_prev: (N, F) the states fed to the cell at each row (flat, as above).
        xs: (N, D) the inputs of each row.

    Returns:
        A function a (N, F) -> J^T a (N, F) (capturable: static shapes, no host reads), or None
        when the cell's structure is not known here (the caller uses autograd instead).
    """
    kind = _kind(cell)
    with torch.no_grad():
        h, x = h_prev.detach(), xs.detach()
        if kind == "vanilla":
            m = cell.__self__
            pre = F.linear(h, m.W_h) + F.linear(x, m.W_x, m.b_h)  # (N, F)
            return _elementwise_then_matmul(torch.sigmoid(pre), m.W_h)  # softplus' = sigmoid
        if kind == "rnn":
            pre = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(
                h, cell.weight_hh, cell.bias_hh
            )
            tanh = cell.nonlinearity == "tanh"
            d = 1 - torch.tanh(pre) ** 2 if tanh else (pre > 0).to(pre.dtype)
            return _elementwise_then_matmul(d, cell.weight_hh)
        if kind == "gru":
            return _gru(cell, h, x)
        if kind == "lstm":
            return _lstm(cell, h, x)
    return None


def _elementwise_then_matmul(d: Tensor, w: Tensor) -> StepVJP:
    w = w.detach()

    def vjp(a: Tensor) -> Tensor:
        return torch.mm(d * a, w)  # (N, F) @ (F, F): rows (d * a)_n W

    return vjp


def _gru(cell: nn.GRUCell, h: Tensor, x: Tensor) -> StepVJP:
    H = cell.hidden_size
    gi = F.linear(x, cell.weight_ih, cell.bias_ih)  # (N, 3H): r, z, n
    gh = F.linear(h, cell.weight_hh, cell.bias_hh)  # (N, 3H)
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
    hn = gh[:, 2 * H :]  # W_hn h + b_hn
    n = torch.tanh(gi[:, 2 * H :] + r * hn)
    # dL/d(gate pre-activations) per unit of a: dr, dz, and dn scaled by r (it multiplies hn)
    c_n = (1 - z) * (1 - n * n)  # a -> d pre_n
    c_r = c_n * hn * r * (1 - r)  # a -> d pre_r
    c_z = (h - n) * z * (1 - z)  # a -> d pre_z
    coef = torch.cat([c_r, c_z, c_n * r], dim=1)  # (N, 3H), multiplies a repeated 3 times
    w = cell.weight_hh.detach()  # (3H, H)

    def vjp(a: Tensor) -> Tensor:
        return torch.addmm(z * a, coef * a.repeat(1, 3), w)  # (N, H)

    return vjp


def _lstm(cell: nn.LSTMCell, hc: Tensor, x: Tensor) -> StepVJP:
    H = cell.hidden_size
    h, c = hc[:, :H], hc[:, H:]
    gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)
    i = torch.sigmoid(gates[:, :H])
    f = torch.sigmoid(gates[:, H : 2 * H])
    g = torch.tanh(gates[:, 2 * H : 3 * H])
    o = torch.sigmoid(gates[:, 3 * H :])
    tc = torch.tanh(f * c + i * g)  # tanh(c')
    dc_dah = o * (1 - tc * tc)  # d c' per unit of a_h (through h' = o tanh(c'))
    # d pre-activation of each gate per unit of dc' (i, f, g) or of a_h (o)
    k_i, k_f, k_g = g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)
    k_o = tc * o * (1 - o)
    w = cell.weight_hh.detach()  # (4H, H)

    def vjp(a: Tensor) -> Tensor:
        ah, ac = a[:, :H], a[:, H:]
        dc = ac + ah * dc_dah  # (N, H) total dL/dc'
        dgates = torch.cat([k_i * dc, k_f * dc, k_g * dc, k_o * ah], dim=1)  # (N, 4H)
        return torch.cat([torch.mm(dgates, w), f * dc], dim=1)  # (N, 2H): d h, d c

    return vjp
