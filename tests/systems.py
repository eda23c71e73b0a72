"""Random triangular systems for the tests (float64)."""

from __future__ import annotations

import torch

from ffsolve.models.causal import CausalMLP, CausalMLPConfig


def dense(T: int = 40, C: int = 3, gain: float = 2.0, seed: int = 0) -> CausalMLP:
    """A causal network with dense dependencies, (B, T, C) -> (B, T, C)."""
    return CausalMLP(CausalMLPConfig(T, C, hidden=64, depth=2, gain=gain, seed=seed)).double()


def chain(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x_t = sin(1.3 x_{t-1}) + 0.5 (t depends on t-1 only); x_0 = 0.5."""
    prev = x.roll(1, dims=dim)
    out = torch.sin(1.3 * prev) + 0.5
    first = [slice(None)] * x.dim()
    first[dim] = 0
    out[tuple(first)] = 0.5
    return out
