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

`cached=True` switches on the cheap paths (`problems.pixelcnn_cache`), which compute the same
functions on crops and so agree with the full forward to rounding (float64: ~1e-15; float32:
not always bitwise, so the discrete component choice may flip on a near tie):
- the `stepper` is a cached sequential sampler (each layer recomputed on one row per level,
  only the streams the last pixel can reach);
- `evaluate(x, start, stop)` runs the forward on the image rows [0, R) only, R the last row of
  the window rounded up to a multiple of 4 (rows below the window are never computed);
- `block_sweep` with blocks of one image row (Jacobi-GS) runs one full pass that freezes the
  context of the rows above, then sweeps the W columns with cached single-pixel steps for all
  rows at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.graphs import CapturedCall
from ffsolve.models.pixelcnnpp import PixelCNNpp, sample_mixture
from ffsolve.problems.base import Problem, check_finite
from ffsolve.problems.pixelcnn_cache import LEVELS, max_row, needed_now, row_pass

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
        capture: on CUDA, capture the forward plus the sampling arithmetic once in a CUDA
            graph and replay it for every evaluation (both the sequential loop and the
            parallel sweeps use it, so comparisons stay like for like).
        cached: use the cheap paths (see the module docstring): a cached sequential stepper,
            cropped windows and cached Jacobi-GS row sweeps. With `capture` too, the whole
            cached sequential loop may be captured in one CUDA graph (`capturable_stepper`).

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
        capture: bool = False,
        cached: bool = False,
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
        check_finite("gumbel noise", gumbel)
        check_finite("logistic noise", logistic)
        self.model = model.freeze_weight_norm()
        self.gumbel, self.logistic = gumbel, logistic
        self.shape = (C, H, W)
        self.length = H * W
        self.compute_dtype = p.dtype
        self.cached = bool(cached)
        # the cached loop restarts at step 0 from x and has static shapes per step
        self.capturable_stepper = self.cached and capture
        self.capture = bool(capture)
        if capture:
            if p.device.type != "cuda":
                raise ValueError("capture=True needs the model on a CUDA device")
            self._replay("full", self._full, self.initial())  # capture the forward now

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

    def _replay(self, key: object, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """fn(x); with `capture`, through a CUDA graph of fn captured on first use under `key`
        in `self.graphs` (the result is then a buffer overwritten by the next replay: consume
        it first)."""
        if not self.capture:
            return fn(x)
        # three warm-up calls: cuDNN autotuning and allocations happen off the graph
        call = self.graphs.get(("forward", key), lambda: CapturedCall(fn, x, warmup=3))
        return call(x)

    def full(self, x: Tensor) -> Tensor:
        """f at every position, (B, H*W, C); through the captured graph when there is one
        (the result is then a buffer overwritten by the next call: consume it first)."""
        return self._replay("full", self._full, x)

    # --- the problem protocol ------------------------------------------------------------
    def initial(self) -> Tensor:
        C = self.shape[0]
        B = self.logistic.shape[0]
        dev, dt = self.logistic.device, self.logistic.dtype
        return torch.zeros(B, self.length, C, device=dev, dtype=dt)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        if not self.cached or stop == self.length:
            return self.full(x)[:, start:stop]
        C, H, W = self.shape
        R = min(H, -(-((stop - 1) // W + 1) // 4) * 4)  # rows needed, a multiple of 4
        if R == H:
            return self.full(x)[:, start:stop]
        return self._replay(("top", R), lambda v: self._top(v, R), x)[:, start:stop]

    def evaluate_at(self, x: Tensor, index: Tensor) -> Tensor:
        return self.full(x).index_select(1, index)

    def _top(self, x: Tensor, R: int) -> Tensor:
        """f at the positions of the image rows [0, R) (B, R*W, C), R a multiple of 4: a
        forward over those rows only (exact: every layer is causal in rows; equal to the full
        forward to rounding, not bitwise in float32: see `PixelCNNpp.forward_top`)."""
        C, H, W = self.shape
        B = x.shape[0]
        img = x.view(B, H, W, C)[:, :R].permute(0, 3, 1, 2).to(self.compute_dtype)
        params = self.model.forward_top(img)  # (B, K, R, W)
        out = sample_mixture(
            params.to(self.logistic.dtype),
            self.gumbel[:, :R],
            self.logistic[:, :R],
            self.model.config.mixtures,
        )  # (B, R, W, C)
        return out.reshape(B, R * W, C)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        if self.cached:
            return _CachedStepper(self, x)
        # The sequential reference: the same full forward as a sweep, one pixel kept.
        return lambda t: self.full(x)[:, t : t + 1]

    def block_sweep(self, x: Tensor, block_size: int) -> Tensor:
        """One Jacobi-GS iteration; with `cached` and blocks of one image row, the cached
        row sweep (`_row_sweep`), else the generic one."""
        if self.cached and block_size == self.shape[2]:
            return self._replay("rows", self._row_sweep, x)
        return super().block_sweep(x, block_size)

    def block_sweep_evals(self, block_size: int) -> int:
        # the cached row sweep: one full pass, then W - 1 cached steps (each a partial
        # forward of every row at once), counted as one model evaluation each
        return block_size * self.num_evals_per_step

    def _image(self, x: Tensor) -> Tensor:
        """States (B, H*W, C) -> network input with its channel of ones (B, C+1, H, W)."""
        C, H, W = self.shape
        img = x.view(-1, H, W, C).permute(0, 3, 1, 2).to(self.compute_dtype)
        return torch.cat([img, torch.ones_like(img[:, :1])], dim=1)

    def _sample(self, params: Tensor, rows, j: int) -> Tensor:
        """Samples (N, C) of column j of image rows `rows` (a slice or an index tensor) from
        params (N, K, 1, 1), N = len(rows) * B ordered (row, image)."""
        M = self.gumbel.shape[-1]
        g = self.gumbel[:, rows, j].transpose(0, 1).reshape(-1, 1, 1, M)
        e = self.logistic[:, rows, j].transpose(0, 1).reshape(-1, 1, 1, self.shape[0])
        out = sample_mixture(params.to(self.logistic.dtype), g, e, self.model.config.mixtures)
        return out.reshape(-1, self.shape[0])

    def _row_sweep(self, x: Tensor) -> Tensor:
        """Pixel (i, j) <- f given the rows < i of x and the new pixels (i, < j), for all i.

        The certificate of the solver loop holds for this map as for Gauss-Seidel: positions
        unchanged in a prefix are final. The first uncertified row is swept from final rows,
        so it becomes final: at most H iterations.
        """
        C, H, W = self.shape
        B = x.shape[0]
        net = self.model
        heights = [H >> level for level in range(LEVELS)]
        maps: dict[str, Tensor] = {"image": self._image(x)}
        whole = [(0, h) for h in heights]
        every = [True] * LEVELS
        last = row_pass(net, maps, whole, every, every, heights)  # the frozen context
        params = net.head(F.elu(maps[last][:, :, :, :1]))  # (B, K, H, 1): column 0
        new = x.view(B, H, W, C).clone()
        col0 = params.permute(2, 0, 1, 3).reshape(H * B, -1, 1, 1)  # (row, image) order
        new[:, :, 0] = self._sample(col0, slice(None), 0).view(H, B, C).transpose(0, 1)
        # rows sharing one schedule (which levels row i reaches: ul at level l iff
        # 2^l divides i), each with a representative row `rep` of that schedule: local
        # windows of rep >> l + 1 rows per level, whose last row is the row's own
        schedules = [(0, 4, 4, [True, True, True]), (2, 4, 6, [True, True, False])]
        schedules.append((1, 2, 5, [True, False, False]))
        groups = []
        for first, stride, rep, do_ul in schedules:
            rows = torch.arange(first, H, stride, device=x.device)
            local = {k: _windows(m, rows, rep, _level(m, H)) for k, m in maps.items()}
            groups.append((rows, rep, local, do_ul))
        no_u = [False] * LEVELS  # u at row i depends on rows < i only: frozen
        for j in range(1, W):
            for rows, rep, local, do_ul in groups:
                Q = rows.numel()
                pix = new[:, rows, j - 1].transpose(0, 1).reshape(Q * B, C)
                local["image"][:, :C, rep, j - 1] = pix.to(self.compute_dtype)
                rr = [(rep >> level, (rep >> level) + 1) for level in range(LEVELS)]
                hs = [r[1] for r in rr]
                now = [d and needed_now(lv, j) for lv, d in enumerate(do_ul)]
                last = row_pass(net, local, rr, no_u, now, hs)
                params = net.head(F.elu(local[last][:, :, rep : rep + 1, j : j + 1]))
                out = self._sample(params, rows, j)  # (Q*B, C)
                new[:, rows, j] = out.view(Q, B, C).transpose(0, 1)
        return new.view(B, H * W, C)

    def to_images(self, x: Tensor) -> Tensor:
        """States (B, H*W, C) -> images (B, C, H, W) in [-1, 1]."""
        C, H, W = self.shape
        return x.reshape(-1, H, W, C).permute(0, 3, 1, 2)


def _level(m: Tensor, H: int) -> int:
    return (H // m.shape[2]).bit_length() - 1


def _windows(m: Tensor, rows: Tensor, rep: int, level: int) -> Tensor:
    """Local windows of the map m (B, Ch, H_l, W_l) for the image rows `rows` (Q,):
    (Q*B, Ch, h, W_l), h = (rep >> level) + 1, whose local row a is the map's row
    (i >> level) - (rep >> level) + a (zero rows above the map: the causal padding)."""
    B, Ch, _, Wl = m.shape
    h = (rep >> level) + 1
    pad = h  # zero rows above, enough for the most negative index
    idx = (rows >> level)[:, None] - (rep >> level) + torch.arange(h, device=m.device) + pad
    mp = F.pad(m, (0, 0, pad, 0))
    w = mp.index_select(2, idx.flatten()).view(B, Ch, rows.numel(), h, Wl)
    return w.permute(2, 0, 1, 3, 4).reshape(rows.numel() * B, Ch, h, Wl)


class _CachedStepper:
    """The cached sequential sampler: step(t) recomputes each level's current row of the
    streams the last written pixel reaches (`max_row`), then the head at pixel t only.
    step(0) starts over (fresh caches), so the loop can be replayed."""

    def __init__(self, problem: PixelCNNSampling, x: Tensor) -> None:
        self.p = problem
        self.x = x
        C, H, W = problem.shape
        self.heights = [H >> level for level in range(LEVELS)]
        self.maps: dict[str, Tensor] = {}

    def __call__(self, t: int) -> Tensor:
        p = self.p
        C, H, W = p.shape
        i, j = divmod(t, W)
        if t == 0:
            self.maps = {}
        changed = (t - 1) // W if t else -1  # the row of the last written pixel
        self.maps["image"] = p._image(self.x)
        rows = [(i >> level, (i >> level) + 1) for level in range(LEVELS)]
        do_u = [changed <= max_row("u", lv, i >> lv) for lv in range(LEVELS)]
        do_ul = [changed <= max_row("ul", lv, i >> lv) for lv in range(LEVELS)]
        if changed == i:  # within a row: see `pixelcnn_cache.needed_now`
            do_ul = [d and needed_now(lv, j) for lv, d in enumerate(do_ul)]
        last = row_pass(p.model, self.maps, rows, do_u, do_ul, self.heights)
        params = p.model.head(F.elu(self.maps[last][:, :, i : i + 1, j : j + 1]))
        return p._sample(params, slice(i, i + 1), j).view(-1, 1, C)  # (B, 1, C)
