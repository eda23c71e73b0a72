"""Diffusion sampling (DDPM, DDIM) as a triangular system over the denoising steps.

With every random draw made up front (the starting noise x_T and one noise z_i per step), a
sampler is a function of that noise: step i (timestep t_i, in the schedule's order) maps
x_{t_i} to x_{t_{i+1}} = mean(x_{t_i}, eps(x_{t_i}, t_i)) + sigma_i z_i. Position i of the state
holds the sample after step i, and f_i reads position i - 1 only (x_T before step 0): a
first-order system, so every method applies, `picard` (ParaDiGMS) and `anderson` (ParaTAA)
included. One sweep evaluates a window of n steps as ONE batched call of the denoiser on
n * B images, which is what a parallel sampler gains on a GPU: a small UNet's call costs
about as much for 16 images as for one.

The step arithmetic is written here from the scheduler's own schedule (its `alphas_cumprod`,
`timesteps`, prediction type, clipping, variance type; DDPM or DDIM with any eta), for a
window of timesteps at once; the sequential loop uses the same function one step at a time,
so both run one program (the batch size differs: bitwise equality then depends on the
kernels; the experiment reports the difference to the plain loop).

Example:
    >>> sched = DDIMScheduler.from_config(config); sched.set_timesteps(100)
    >>> x_T, z = diffusion_noise(4, (1, 28, 28), 100, torch.Generator().manual_seed(0))
    >>> problem = DiffusionSampling(unet, sched, x_T, z, eta=0.0)
    >>> images = problem.images(ffsolve.solve(problem, method="picard", window=32).value)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ffsolve.problems.base import Problem, check_finite

__all__ = ["DiffusionSampling", "diffusion_noise"]


def diffusion_noise(
    batch: int,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The starting noise x_T (B, *shape) and one standard normal draw per step (steps, B,
    *shape), drawn on the CPU in float64 from `generator` (the same seed gives the same
    noise on every device), then moved."""
    x_T = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    z = torch.randn(steps, batch, *shape, generator=generator, dtype=torch.float64)
    return x_T.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)


class DiffusionSampling(Problem):
    """Sampling a diffusion model with a DDPM or DDIM schedule, given all its noise.

    Args:
        denoiser: `denoiser(x (N, C, H, W), t (N,))` -> the model output (epsilon, v or x_0
            as the scheduler's `prediction_type` says), or an object with `.sample` (a
            diffusers `UNet2DModel`). It must treat images independently (eval mode).
        scheduler: a diffusers `DDPMScheduler`/`DDIMScheduler` (or their parallel variants)
            with `set_timesteps` already called: its `timesteps` are the steps.
        x_T: (B, C, H, W) the starting noise.
        noise: (T, B, C, H, W) standard normal draws, one per step (unused where a step adds
            no noise: DDIM with eta 0, DDPM's last step).
        eta: DDIM's eta (0: deterministic); ignored for DDPM.
        kind: "ddpm" or "ddim"; default from the scheduler's class name.

    The state is (B, T, C*H*W): position i is the sample after step i.
    """

    dim = 1
    first_order = True  # step i reads position i - 1 only
    capturable = True  # static shapes for a fixed window, no host reads
    capturable_stepper = True  # one step per call, restarting from x_T: the loop is capturable
    window_on_device = True  # a window gathers its inputs, timesteps and noise by index

    def __init__(
        self,
        denoiser: Callable[..., Any],
        scheduler: Any,
        x_T: Tensor,
        noise: Tensor,
        *,
        eta: float = 0.0,
        kind: str | None = None,
    ) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        timesteps = getattr(scheduler, "timesteps", None)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        config = getattr(scheduler, "config", None)
        if timesteps is None or alphas is None or config is None:
            raise TypeError(
                "scheduler must be a diffusers DDPM or DDIM scheduler (timesteps, "
                f"alphas_cumprod, config), got {type(scheduler).__name__}"
            )
        kind = kind or ("ddim" if "DDIM" in type(scheduler).__name__ else "ddpm")
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
        if getattr(config, "thresholding", False):
            raise ValueError("schedulers with dynamic thresholding are not supported")
        prediction = getattr(config, "prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction!r}")
        variance_type = getattr(config, "variance_type", "fixed_small")
        if kind == "ddpm" and variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"DDPM variance_type {variance_type!r} is not supported")
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        ts = torch.as_tensor(timesteps).long().cpu()  # (T,) in sampling order
        T = len(ts)
        if T < 1:
            raise ValueError("the scheduler has no timesteps: call set_timesteps first")
        if ts.max() >= len(alphas) or bool((ts[:-1] <= ts[1:]).any()):
            raise ValueError("the scheduler's timesteps must decrease and lie in its schedule")
        if x_T.dim() != 4:
            raise ValueError(f"x_T must be (B, C, H, W), got {tuple(x_T.shape)}")
        # x_T must fit the denoiser where it says what it takes (a diffusers UNet2DModel: its
        # config and weights); a plain callable may say nothing, and is then not checked here
        C, H, W = x_T.shape[1:]
        declared = getattr(denoiser, "config", None)
        channels = getattr(declared, "in_channels", None)
        if isinstance(channels, int) and channels != C:
            raise ValueError(
                f"x_T has {C} channels, the denoiser takes {channels} (config.in_channels)"
            )
        size = getattr(declared, "sample_size", None)
        size = (size, size) if isinstance(size, int) else size
        if isinstance(size, list | tuple) and len(size) == 2 and tuple(size) != (H, W):
            raise ValueError(
                f"x_T is {H}x{W}, the denoiser was built for {size[0]}x{size[1]} "
                "(config.sample_size)"
            )
        weights = denoiser.parameters() if isinstance(denoiser, torch.nn.Module) else ()
        weight = next((w for w in weights if w.is_floating_point()), None)
        if weight is not None and weight.dtype != x_T.dtype:
            raise ValueError(
                f"x_T is {x_T.dtype}, the denoiser's weights are {weight.dtype}: use one dtype "
                "(e.g. diffusion_noise(..., dtype=) or denoiser.to(dtype))"
            )
        if noise.shape != (T, *x_T.shape):
            raise ValueError(
                f"noise must be (steps, *x_T.shape) = {(T, *x_T.shape)}, got {tuple(noise.shape)}"
            )
        if noise.device != x_T.device or noise.dtype != x_T.dtype:
            raise ValueError("x_T and noise must share one device and dtype")
        check_finite("x_T", x_T)
        check_finite("noise", noise)
        self.denoiser, self.scheduler, self.kind, self.eta = denoiser, scheduler, kind, eta
        self.prediction = prediction
        self.clip = (
            float(config.clip_sample_range) if getattr(config, "clip_sample", False) else None
        )
        self.x_T, self.noise = x_T, noise
        self.B, self.image_shape = x_T.shape[0], tuple(x_T.shape[1:])
        self.F = math.prod(self.image_shape)
        self.length = T
        self.timesteps = ts.to(x_T.device)
        dev, dt = x_T.device, torch.float64
        abar = torch.as_tensor(alphas, dtype=dt).cpu()
        prev = torch.cat([ts[1:], torch.tensor([-1])])  # the timestep each step lands on
        final = abar.new_tensor(1.0)
        if kind == "ddim" and not getattr(config, "set_alpha_to_one", True):
            final = abar[0]
        a_t = abar[ts]
        a_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
        beta = 1 - a_t / a_prev  # the step's own beta
        posterior = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # DDPM fixed_small
        if kind == "ddpm":
            var = posterior if variance_type == "fixed_small" else beta
            sigma = torch.where(prev >= 0, var.sqrt(), 0.0)  # no noise on the last step
        else:
            sigma = eta * posterior.sqrt()
        # per-step coefficients, (T,) float64, applied in the state's dtype
        self._coef = {
            "sqrt_a": a_t.sqrt(),
            "sqrt_1ma": (1 - a_t).sqrt(),
            "sqrt_a_prev": a_prev.sqrt(),
            "x0_coef": a_prev.sqrt() * beta / (1 - a_t),  # DDPM posterior mean
            "xt_coef": (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t),
            "dir_coef": (1 - a_prev - sigma**2).clamp(min=0).sqrt(),  # DDIM direction
            "sigma": sigma,
        }
        self._coef = {k: v.to(device=dev, dtype=x_T.dtype) for k, v in self._coef.items()}
        # the tolerance rule's noise magnitude, on the samples' device (the peer loop of
        # diffusion-sampling multiplies by it directly: on the CPU it failed on CUDA)
        self._variance = posterior.to(device=dev, dtype=x_T.dtype)

    # --- one step, for a window of timesteps at once -------------------------------------
    def step(self, x: Tensor, index: slice | Tensor) -> Tensor:
        """x_{t_{i+1}} from x_{t_i} for the steps i of `index` (a slice of positions, or a
        (n,) long tensor of them on the samples' device: gathered, no host read):
        x (n, B, C, H, W) -> (n, B, C, H, W), one denoiser call on n * B images."""
        n = x.shape[0]
        c = {k: v[index].view(n, 1, 1, 1, 1) for k, v in self._coef.items()}
        t = self.timesteps[index].repeat_interleave(self.B)  # (n B,)
        out = self.denoiser(x.reshape(n * self.B, *self.image_shape), t)
        out = getattr(out, "sample", out).reshape(x.shape)  # (n, B, C, H, W)
        if self.prediction == "epsilon":
            x0, eps = (x - c["sqrt_1ma"] * out) / c["sqrt_a"], out
        elif self.prediction == "v_prediction":
            x0 = c["sqrt_a"] * x - c["sqrt_1ma"] * out
            eps = c["sqrt_a"] * out + c["sqrt_1ma"] * x
        else:
            x0, eps = out, (x - c["sqrt_a"] * out) / c["sqrt_1ma"]
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        if self.kind == "ddpm":
            mean = c["x0_coef"] * x0 + c["xt_coef"] * x
        else:
            mean = c["sqrt_a_prev"] * x0 + c["dir_coef"] * eps
        return mean + c["sigma"] * self.noise[index]

    # --- the problem protocol ------------------------------------------------------------
    def initial(self) -> Tensor:
        """x_T at every position: (B, T, F)."""
        return self.x_T.reshape(self.B, 1, self.F).expand(self.B, self.length, self.F).clone()

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        B = self.B
        prev = (
            x[:, start - 1 : stop - 1]
            if start > 0
            else torch.cat([self.x_T.reshape(B, 1, self.F), x[:, : stop - 1]], dim=1)
        )  # (B, n, F): the input of each step
        return self._steps(prev, slice(start, stop))

    def evaluate_window(self, x: Tensor, start: Tensor, width: int) -> Tensor:
        """The steps [start, start + width) with `start` a device tensor: their inputs
        (position i - 1, x_T before step 0), timesteps, coefficients and noise gathered."""
        index = torch.arange(width, device=x.device) + start  # (n,)
        prev = x.index_select(1, (index - 1).clamp(min=0))  # (B, n, F)
        x_T = self.x_T.reshape(self.B, 1, self.F)
        prev = torch.where((index == 0)[None, :, None], x_T, prev)
        return self._steps(prev, index)

    def _steps(self, prev: Tensor, index: slice | Tensor) -> Tensor:
        """(B, n, F) inputs of the steps of `index` -> (B, n, F) their outputs."""
        B, n = self.B, prev.shape[1]
        prev = prev.transpose(0, 1).reshape(n, B, *self.image_shape)  # step-major
        out = self.step(prev, index)  # (n, B, C, H, W)
        return out.reshape(n, B, self.F).transpose(0, 1)  # (B, n, F)

    def linear_part(self, start: int, stop: int) -> Tensor:
        """The coefficient of x_{t_i} in step i with the denoiser's output held fixed (for
        epsilon prediction without clipping: DDPM's posterior x_t coefficient plus the
        x_0 path's, DDIM's sqrt(abar_prev / abar_t)), as (n, 1) diagonal factors."""
        c = {k: v[start:stop] for k, v in self._coef.items()}
        if self.prediction != "epsilon":
            return torch.ones(stop - start, 1, dtype=self.x_T.dtype, device=self.x_T.device)
        via_x0 = 1 / c["sqrt_a"]  # d x0 / d x_t
        if self.kind == "ddpm":
            a = c["x0_coef"] * via_x0 + c["xt_coef"]
        else:
            a = c["sqrt_a_prev"] * via_x0
        return a[:, None]

    def noise_variance(self) -> Tensor:
        """The schedule's posterior variance per step (ParaDiGMS's noise magnitude, also for
        DDIM), floored at 1e-20."""
        return self._variance

    def guess(self, x: Tensor, window: Any, certified: Tensor) -> Tensor | None:
        """Positions never computed yet start from the last computed sample (ParaDiGMS:
        closer than x_T); on the device, from the window's frontier."""
        front = window.frontier  # () long: positions < front were computed before
        last = x.index_select(1, (front - 1).clamp(min=0).reshape(1))  # (B, 1, F)
        fresh = (window.positions() >= front) & (front > 0)  # (n,)
        return torch.where(fresh[None, :, None], last, window.take(x))

    def images(self, value: Tensor) -> Tensor:
        """The final samples (B, C, H, W) of a solution (its last position)."""
        return value[:, -1].reshape(self.B, *self.image_shape)
