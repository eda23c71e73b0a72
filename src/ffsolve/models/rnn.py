"""A vanilla RNN written by hand (no torch.nn.RNN): the model of the paper's BPTT experiment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.config import Config, spec

__all__ = ["VanillaRNN", "VanillaRNNConfig"]


@dataclass(frozen=True)
class VanillaRNNConfig(Config):
    """Sizes and initialisation of `VanillaRNN`.

    Attributes:
        input_size: features of x_t.
        hidden: units of the hidden state h_t.
        output_size: features of the output o_t.
        init_std: standard deviation of the Gaussian weights (biases start at 0).
        seed: seed of the generator that draws the weights.
    """

    input_size: int = spec(1, ge=1)
    hidden: int = spec(128, ge=1)
    output_size: int = spec(1, ge=1)
    init_std: float = spec(0.1, ge=0.0)
    seed: int = spec(0, ge=0)


class VanillaRNN(nn.Module):
    """h_t = softplus(W_h h_{t-1} + W_x x_t + b_h), o_t = W_o h_t + b_o.

    The weights are N(0, init_std^2) from a generator seeded with `config.seed`, the biases 0.
    `step` is the cell, usable on its own (e.g. by `ffsolve.backprop_through`); `forward` is the
    plain sequential loop.

    Example:
        >>> rnn = VanillaRNN(VanillaRNNConfig(hidden=16))
        >>> out, hs = rnn(torch.rand(2, 100, 1))       # (2, 100, 1), (2, 100, 16)
    """

    def __init__(self, config: VanillaRNNConfig | None = None) -> None:
        super().__init__()
        config = config or VanillaRNNConfig()
        for name in ("input_size", "hidden", "output_size"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {config.init_std}")
        self.config = config
        D, H, O = config.input_size, config.hidden, config.output_size
        g = torch.Generator().manual_seed(config.seed)

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * config.init_std)

        self.W_h = normal(H, H)
        self.W_x = normal(H, D)
        self.b_h = nn.Parameter(torch.zeros(H))
        self.W_o = normal(O, H)
        self.b_o = nn.Parameter(torch.zeros(O))

    def initial_state(self, batch: int) -> Tensor:
        """h_0 = 0, (batch, hidden), on the device and dtype of the weights."""
        return self.W_h.new_zeros(batch, self.config.hidden)

    def step(self, h: Tensor, x: Tensor) -> Tensor:
        """One transition: h (N, hidden), x (N, input_size) -> h_next (N, hidden)."""
        return F.softplus(F.linear(h, self.W_h) + F.linear(x, self.W_x, self.b_h))

    def step_jacobian(self, h: Tensor, x: Tensor, diagonal: bool = False) -> Tensor:
        """d step(h, x) / d h = diag(sigmoid(pre)) W_h: (N, hidden, hidden), or its diagonal
        (N, hidden) (softplus' = sigmoid)."""
        s = torch.sigmoid(F.linear(h, self.W_h) + F.linear(x, self.W_x, self.b_h))  # (N, H)
        return s * self.W_h.diagonal() if diagonal else s[:, :, None] * self.W_h

    def readout(self, h: Tensor) -> Tensor:
        """o = W_o h + b_o for hidden states (..., hidden) -> (..., output_size)."""
        return F.linear(h, self.W_o, self.b_o)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The sequential loop.

        Args:
            x: inputs (B, T, input_size).
            h0: initial state (B, hidden); zeros when None.

        Returns:
            (outputs (B, T, output_size), hidden states h_1..h_T (B, T, hidden)).
        """
        if x.dim() != 3 or x.shape[2] != self.config.input_size:
            raise ValueError(f"x must be (B, T, {self.config.input_size}), got {tuple(x.shape)}")
        h = self.initial_state(x.shape[0]) if h0 is None else h0
        hs = []
        for t in range(x.shape[1]):
            h = self.step(h, x[:, t])
            hs.append(h)
        hiddens = torch.stack(hs, dim=1)  # (B, T, hidden)
        return self.readout(hiddens), hiddens
