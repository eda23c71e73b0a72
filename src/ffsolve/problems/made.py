"""MADE sampling as a triangular system.

All randomness is drawn before iterating, so sampling is a deterministic map of the noise:
with logistic noise e_d (inverse CDF of a uniform), x_d = clamp(mu_d(x_<d) +
exp(s_d(x_<d)) * e_d) in logit space. Every method solves the same system and must return
the same sample (Song et al. 2021, Sec. 4.2).

The state is kept in sampling order: position t holds dimension `model.ordering[t]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.models.made import MADE
from ffsolve.problems.base import Problem, check_finite

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
    capturable = True  # static shapes, no host reads (window rows come from a device index)
    capturable_stepper = True  # both steppers restart at step 0; prefix sizes are host ints

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
        check_finite("noise", noise)
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite (lo, hi) with lo < hi, got {bounds}")
        self.model = model
        self.length = D
        self.bounds = bounds
        self.incremental = incremental
        self.ordering = model.ordering
        self.natural = bool(torch.equal(model.ordering, torch.arange(D, device=p.device)))
        self.inverse = torch.argsort(model.ordering)  # sampling step of each dimension
        self.noise = noise if self.natural else noise.index_select(1, self.ordering)  # steps
        self._baked: list[Tensor] | None = None  # masked weights, filled by prepare()
        self._versions: tuple[int, ...] = ()

    def _weights_version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def prepare(self) -> None:
        """Bake the masks into the weights, transposed for `addmm` (bias + product in one
        kernel, then an in-place ReLU), into buffers kept across solves (a captured loop
        replayed later reads the current weights)."""
        model = self.model
        pairs = [(lin.weight, m) for lin, m in zip(model.layers, model.masks(), strict=False)]
        pairs.append((model.head.weight, model.mask_head))
        with torch.no_grad():
            if self._baked is None:
                self._baked = [(w * m).T for w, m in pairs]  # (in, out) views of (out, in)
            else:
                for buf, (w, m) in zip(self._baked, pairs, strict=True):
                    torch.mul(w, m, out=buf.T)
        versions = self._weights_version()
        if versions != self._versions:  # a captured stepper holds copies of the old weights
            self.graphs.invalidate()
        self._versions = versions

    def _fast_hidden(self, xd: Tensor) -> Tensor | None:
        """model.hidden(xd) from the baked weights (the same kernels: F.linear is addmm), or
        None when prepare() has not run or the weights changed since."""
        if self._baked is None or self._versions != self._weights_version():
            return None
        h = xd
        for wt, lin in zip(self._baked[:-1], self.model.layers, strict=True):
            h = torch.addmm(lin.bias, h, wt).relu_()  # (B, H_i)
        return h

    def initial(self) -> Tensor:
        p = next(self.model.parameters())
        return torch.zeros(self.noise.shape[0], self.length, device=p.device, dtype=p.dtype)

    def to_dims(self, x: Tensor) -> Tensor:
        return x if self.natural else x.index_select(1, self.inverse)  # (B, D) model order

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        xd = self.to_dims(x)
        h = self._fast_hidden(xd)
        full = start == 0 and stop == self.length and self.natural
        if h is not None and full:
            model = self.model
            out = torch.addmm(model.head.bias, h, self._baked[-1])  # (B, 2D)
            D = self.length
            log_scale = out[:, D:].clamp(min=model.config.min_log_scale)
            z = out[:, :D] + torch.exp(log_scale) * self.noise
            return z.clamp_(*self.bounds)  # (B, D)
        if h is None:
            h = self.model.hidden(xd)  # (B, H_last)
        if full:
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
        masks = model.masks()
        self.weights = [lin.weight * m for lin, m in zip(model.layers, masks, strict=False)]
        self.biases = [lin.bias for lin in model.layers]
        D, order = problem.length, problem.ordering
        head_w = model.head.weight * model.mask_head  # (2D, H_last): locations, log-scales
        # (D, 2, H_last) and (D, 2) in sampling order: step t slices a view, no host transfer
        self.head_w = torch.stack([head_w[order], head_w[order + D]], 1)
        self.head_b = torch.stack([model.head.bias[order], model.head.bias[order + D]], 1)
        # prefix sizes per step: units of degree < t, for every hidden layer (host ints, read
        # once here, so every step has static shapes and the loop can be captured)
        steps = torch.arange(problem.length + 1, device=x.device)
        self.counts = [
            torch.searchsorted(deg, steps, right=False).tolist() for deg in model.degrees()
        ]
        self.cols = self.weights[0].index_select(1, problem.ordering)  # (H1, D) step order
        self.D = problem.length
        # filled at step 0 from the contents of x, so a stepper can be replayed
        self.x_start = torch.empty_like(x)  # the contributions already in the pre-activations
        self.pre = x.new_empty(x.shape[0], self.weights[0].shape[0])  # (B, H1)

    def __call__(self, t: int) -> Tensor:
        if t == 0:  # start over from x as it is now
            self.x_start.copy_(self.x)
            self.pre.copy_(F.linear(self.problem.to_dims(self.x), self.weights[0], self.biases[0]))
        else:  # fold in the dimension sampled at step t - 1
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
