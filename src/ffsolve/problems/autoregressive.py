"""Autoregressive sampling as a triangular system (MADE).

All randomness is drawn before iterating, so sampling is a deterministic map of the noise:
with logistic noise e_d (inverse CDF of a uniform), x_d = clamp(mu_d(x_<d) +
exp(s_d(x_<d)) * e_d) in logit space. Every method solves the same system and must return
the same sample (Song et al. 2021, Sec. 4.2).

The state is kept in sampling order: position t holds dimension `model.ordering[t]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.models.made import MADE
from ffsolve.problems.base import Problem

__all__ = ["MADESampling", "logistic_noise"]


def logistic_noise(
    batch: int,
    dims: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard logistic noise (batch, dims) by the inverse CDF: log u - log(1 - u).

    Drawn on the CPU from `generator` (so a seed gives the same noise on every device), then
    moved.
    """
    u = torch.rand(batch, dims, generator=generator, dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (torch.log(u) - torch.log1p(-u)).to(device=device, dtype=dtype)


class MADESampling(Problem):
    """Sampling a MADE given noise, as x_t = f_t(x_<t) over the D dimensions.

    Args:
        model: a MADE (its device and dtype are used).
        noise: (B, D) logistic noise in the model's dimension order (not sampling order).
        bounds: (lo, hi) logit-space clamp of a sample, e.g. `ffsolve.data.logit_bounds`.
        incremental: the sequential `stepper` updates the first layer's pre-activations by
            one column per step and evaluates only the hidden units and output the next
            dimension needs (the strongest sequential baseline); otherwise it runs the whole
            network per dimension (the naive loop).

    Example:
        >>> problem = MADESampling(made, logistic_noise(100, 784, g), (-13.8, 13.8))
        >>> sample = ffsolve.solve(problem, method="jacobi").value  # (100, 784)
    """

    dim = 1

    def __init__(
        self, model: MADE, noise: Tensor, bounds: tuple[float, float], incremental: bool = False
    ) -> None:
        D = model.dims
        if noise.dim() != 2 or noise.shape[1] != D:
            raise ValueError(f"noise must be (B, {D}), got {tuple(noise.shape)}")
        p = next(model.parameters())
        if noise.device != p.device or noise.dtype != p.dtype:
            raise ValueError(
                f"noise is {noise.dtype} on {noise.device}, the model {p.dtype} on {p.device}"
            )
        self.model = model
        self.length = D
        self.bounds = bounds
        self.incremental = incremental
        self.ordering = model.ordering
        self.natural = bool(torch.equal(model.ordering, torch.arange(D, device=p.device)))
        self.inverse = torch.argsort(model.ordering)  # sampling step of each dimension
        self.noise = noise if self.natural else noise.index_select(1, self.ordering)  # steps

    def initial(self) -> Tensor:
        p = next(self.model.parameters())
        return torch.zeros(self.noise.shape[0], self.length, device=p.device, dtype=p.dtype)

    def to_dims(self, x: Tensor) -> Tensor:
        return x if self.natural else x.index_select(1, self.inverse)  # (B, D) model order

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        h = self.model.hidden(self.to_dims(x))  # (B, H_last)
        if start == 0 and stop == self.length and self.natural:
            loc, log_scale = self.model.head_rows(h)  # one GEMM for every output
        else:  # only the rows of the window (cheaper for gs_jacobi)
            loc, log_scale = self.model.head_rows(h, self.ordering[start:stop])
        z = loc + torch.exp(log_scale) * self.noise[:, start:stop]
        return z.clamp(*self.bounds)  # (B, stop - start)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        if not self.incremental:
            # The naive loop: the whole network per dimension, as in the original code.
            return lambda t: self.evaluate(x, 0, self.length)[:, t : t + 1]
        return _IncrementalMADE(self, x)


class _IncrementalMADE:
    """One dimension per call, computing only what output t needs.

    Hidden degrees are sorted, so the units an output of rank t may see (degree < t) are a
    prefix of every hidden layer; the first layer's pre-activations are kept and updated
    with one weight column per sampled dimension (as in Fast PixelCNN++'s caching idea,
    applied to MADE).
    """

    def __init__(self, problem: MADESampling, x: Tensor) -> None:
        model = problem.model
        self.problem = problem
        self.x = x  # (B, D) the solver's live state, sampling order
        self.x_start = x.clone()  # the contributions already in the pre-activations
        masks = model.masks()
        self.weights = [lin.weight * m for lin, m in zip(model.layers, masks, strict=False)]
        self.biases = [lin.bias for lin in model.layers]
        D, order = problem.length, problem.ordering
        head_w = model.head.weight * model.mask_head  # (2D, H_last): locations, log-scales
        # (D, 2, H_last) and (D, 2) in sampling order: step t slices a view, no host transfer
        self.head_w = torch.stack([head_w[order], head_w[order + D]], 1)
        self.head_b = torch.stack([model.head.bias[order], model.head.bias[order + D]], 1)
        # prefix sizes per step: units of degree < t, for every hidden layer (host ints)
        steps = torch.arange(problem.length + 1, device=x.device)
        self.counts = [
            torch.searchsorted(deg, steps, right=False).tolist() for deg in model.degrees()
        ]
        self.pre = F.linear(problem.to_dims(x), self.weights[0], self.biases[0])  # (B, H1)
        self.cols = self.weights[0].index_select(1, problem.ordering)  # (H1, D) step order
        self.D = problem.length

    def __call__(self, t: int) -> Tensor:
        if t > 0:  # fold in the dimension sampled at step t - 1
            delta = self.x[:, t - 1 : t] - self.x_start[:, t - 1 : t]  # (B, 1)
            self.pre.addmm_(delta, self.cols[:, t - 1 : t].T)
        n = [c[t] for c in self.counts]
        h = F.relu(self.pre[:, : n[0]])  # (B, n0)
        for i in range(1, len(self.weights)):
            h = F.relu(F.linear(h, self.weights[i][: n[i], : n[i - 1]], self.biases[i][: n[i]]))
        out = F.linear(h, self.head_w[t, :, : n[-1]], self.head_b[t])  # (B, 2)
        loc = out[:, :1]
        log_scale = out[:, 1:].clamp(min=self.problem.model.config.min_log_scale)
        z = loc + torch.exp(log_scale) * self.problem.noise[:, t : t + 1]
        return z.clamp(*self.problem.bounds)  # (B, 1)
