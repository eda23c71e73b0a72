"""PixelCNN++ sampling as a triangular system over the pixels in raster order.

All randomness is drawn before iterating (`pixelcnn_noise`): Gumbel noise picks each pixel's
mixture component (argmax of logits + Gumbel), logistic noise gives each channel's value by
the inverse CDF, so a sample is a deterministic map of the noise and every method must return
the same image (Song et al. 2021, Sec. 4.3).

State: (B, H*W, C), position t = pixel (t // W, t % W); the C channels of a pixel are one
position's features, produced together (channel c from channels < c through the mixture's
coefficients). The start is a mid-grey image (zeros in [-1, 1]).

Exactness on real hardware: the sequential reference (`stepper`) runs the very same full
forward as a Jacobi sweep and keeps one pixel, so both evaluate every pixel with identical
kernels and shapes; the Gumbel argmax then cannot flip between them, and Jacobi's fixed point
is the sequential sample bitwise (on the CPU and the GPU). Against any other baseline
(e.g. a cached sampler) report the number of differing pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ffsolve.models.pixelcnnpp import PixelCNNpp, sample_mixture
from ffsolve.problems.base import Problem

__all__ = ["PixelCNNSampling", "pixelcnn_noise"]


def pixelcnn_noise(
    batch: int,
    shape: tuple[int, int, int],
    mixtures: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Gumbel noise (B, H, W, M) for the components and logistic noise (B, H, W, C) for the
    values, drawn in float64 on the CPU from `generator` (the same seed gives the same noise on
    every device), then moved.

    Args:
        batch: B.
        shape: (C, H, W) of the images.
        mixtures: M, mixture components.
    """
    C, H, W = shape
    u = torch.rand(batch, H, W, mixtures, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
    v = torch.rand(batch, H, W, C, generator=generator, dtype=torch.float64)
    v = v.clamp(1e-12, 1 - 1e-12)
    logistic = torch.log(v) - torch.log1p(-v)
    return gumbel.to(device=device, dtype=dtype), logistic.to(device=device, dtype=dtype)


class PixelCNNSampling(Problem):
    """Sampling a PixelCNN++ given its noise, as x_t = f_t(x_<t) over the H*W pixels.

    Args:
        model: a PixelCNN++ in eval mode (its weight norm is frozen here for speed).
        gumbel: (B, H, W, M) Gumbel noise, from `pixelcnn_noise`.
        logistic: (B, H, W, C) logistic noise, same device; its dtype is the state's.
        The network runs in the model's dtype (convert it, e.g. `model.to(torch.bfloat16)`,
        for a cheaper forward), the sampling arithmetic and the state in the noise's dtype.
        cuda_graph: on CUDA, capture the forward plus the sampling arithmetic once in a CUDA
            graph and replay it for every evaluation (both the sequential loop and the
            parallel sweeps use it, so comparisons stay like for like).

    Example:
        >>> g, e = pixelcnn_noise(16, (1, 28, 28), 10, torch.Generator().manual_seed(0))
        >>> image = ffsolve.solve(PixelCNNSampling(net, g, e), method="jacobi").value
    """

    dim = 1

    def __init__(
        self,
        model: PixelCNNpp,
        gumbel: Tensor,
        logistic: Tensor,
        *,
        cuda_graph: bool = False,
    ) -> None:
        cfg = model.config
        C, H, W, M = cfg.channels, cfg.height, cfg.width, cfg.mixtures
        if logistic.dim() != 4 or logistic.shape[1:] != (H, W, C):
            raise ValueError(
                f"logistic noise must be (B, {H}, {W}, {C}) for this model, "
                f"got {tuple(logistic.shape)}"
            )
        B = logistic.shape[0]
        if B < 1:
            raise ValueError("the batch is empty")
        if gumbel.shape != (B, H, W, M):
            raise ValueError(
                f"gumbel noise must be ({B}, {H}, {W}, {M}), got {tuple(gumbel.shape)}"
            )
        p = next(model.parameters())
        if not logistic.dtype.is_floating_point or gumbel.dtype != logistic.dtype:
            raise ValueError(
                f"noise must be floating and of one dtype, got {gumbel.dtype} and {logistic.dtype}"
            )
        if gumbel.device != p.device or logistic.device != p.device:
            raise ValueError(
                f"noise is on {logistic.device} / {gumbel.device}, the model on {p.device}"
            )
        if model.training:
            raise ValueError("the model is in training mode (dropout): call model.eval() first")
        self.model = model.freeze_weight_norm()
        self.gumbel, self.logistic = gumbel, logistic
        self.shape = (C, H, W)
        self.length = H * W
        self.compute_dtype = p.dtype
        self._graph = None
        if cuda_graph:
            if p.device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture()

    # --- the full evaluation -------------------------------------------------------------
    def _full(self, x: Tensor) -> Tensor:
        """Every pixel's sample given the image x (B, H*W, C) -> (B, H*W, C)."""
        C, H, W = self.shape
        B = x.shape[0]
        img = x.view(B, H, W, C).permute(0, 3, 1, 2).to(self.compute_dtype)  # (B, C, H, W)
        params = self.model(img)  # (B, K, H, W)
        out = sample_mixture(
            params.to(self.logistic.dtype),
            self.gumbel,
            self.logistic,
            self.model.config.mixtures,
        )  # (B, H, W, C)
        return out.reshape(B, H * W, C)

    def _capture(self) -> None:
        B = self.logistic.shape[0]
        C = self.shape[0]
        dev = self.logistic.device
        self._static_in = torch.zeros(B, self.length, C, device=dev, dtype=self.logistic.dtype)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up: cudnn autotuning and allocations off the graph
                self._full(self._static_in)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._static_out = self._full(self._static_in)
        self._graph = graph

    def full(self, x: Tensor) -> Tensor:
        """f at every position, (B, H*W, C); through the captured graph when there is one
        (the result is then a buffer overwritten by the next call: consume it first)."""
        if self._graph is None:
            return self._full(x)
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out

    # --- the problem protocol ------------------------------------------------------------
    def initial(self) -> Tensor:
        C = self.shape[0]
        B = self.logistic.shape[0]
        dev, dt = self.logistic.device, self.logistic.dtype
        return torch.zeros(B, self.length, C, device=dev, dtype=dt)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self.full(x)[:, start:stop]

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        return self.full(x).index_select(1, index)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        # The sequential reference: the same full forward as a sweep, one pixel kept.
        return lambda t: self.full(x)[:, t : t + 1]

    def to_images(self, x: Tensor) -> Tensor:
        """States (B, H*W, C) -> images (B, C, H, W) in [-1, 1]."""
        C, H, W = self.shape
        return x.reshape(-1, H, W, C).permute(0, 3, 1, 2)
