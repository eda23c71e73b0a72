"""A random causal MLP: a dense triangular system with feature dimensions per position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ffsolve.config import Config, spec

__all__ = ["CausalMLP", "CausalMLPConfig"]


@dataclass(frozen=True)
class CausalMLPConfig(Config):
    length: int = spec(64, ge=1)  # T positions
    channels: int = spec(1, ge=1)  # C features per position
    hidden: int = spec(256, ge=1)  # hidden units
    depth: int = spec(2, ge=1)  # hidden layers
    gain: float = spec(1.0, ge=0.0)  # weight scale; larger: stronger coupling, slower Jacobi
    seed: int = spec(0, ge=0)


class CausalMLP(nn.Module):
    """out[:, t] = g_t(x[:, :t]) for x of shape (B, T, C), with dense dependencies.

    Masks follow MADE (Germain et al. 2015): hidden unit h has a degree m_h in [0, T-2] and
    sees positions <= m_h; output position t sees hidden units with m_h < t. Position 0
    depends on nothing (its output is a function of the biases alone).
    """

    def __init__(self, config: CausalMLPConfig) -> None:
        super().__init__()
        self.config = config
        T, C, H = config.length, config.channels, config.hidden
        g = torch.Generator().manual_seed(config.seed)
        degrees = torch.randint(0, max(T - 1, 1), (config.depth, H), generator=g)
        pos = torch.arange(T).repeat_interleave(C)  # (T*C,) position of each input feature
        layers, masks = [], []
        prev = pos
        for layer in range(config.depth):
            m = degrees[layer]
            # input positions <= m for the first layer; later hidden layers: degree <= m
            masks.append((prev[None, :] <= m[:, None]).float())
            layers.append(nn.Linear(prev.numel(), H))
            prev = m
        masks.append((prev[None, :] < pos[:, None]).float())  # output t sees degrees < t
        layers.append(nn.Linear(H, T * C))
        self.layers = nn.ModuleList(layers)
        with torch.no_grad():
            for lin in self.layers:
                w = torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5
                lin.weight.copy_(w * config.gain)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        for i, mask in enumerate(masks):
            self.register_buffer(f"mask{i}", mask)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = x.reshape(B, T * C)  # (B, T*C)
        n = len(self.layers)
        for i, lin in enumerate(self.layers):
            h = nn.functional.linear(h, lin.weight * getattr(self, f"mask{i}"), lin.bias)
            h = torch.relu(h) if i < n - 1 else torch.tanh(h)
        return h.reshape(B, T, C)  # (B, T, C)
