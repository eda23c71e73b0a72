"""A small DDPM denoiser (Ho, Jain and Abbeel, NeurIPS 2020) built from diffusers' UNet2DModel.

The network predicts the noise eps of x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (epsilon
prediction) for 1-channel 28x28 images in [-1, 1], with the paper's linear betas (1e-4 to
0.02 over 1000 steps). The UNet runs at 28x28 itself, with no padding: with at most three
resolution levels it downsamples 28 -> 14 -> 7 and upsamples back exactly (a fourth level
would need 7 -> 3, so `DDPMConfig` refuses it; pad to 32x32 outside for deeper UNets).

    levels            block_out_channels, e.g. (64, 128, 128) at 28x28, 14x14, 7x7
    per level         layers_per_block ResNet blocks; self-attention in every level but
                      the first when `attention` (and in the middle block)

diffusers is an optional dependency (`pip install -e .[diffusion]`), imported only inside
these functions. The model knows nothing about solvers; `sample_ddpm` is the plain
sequential sampling loop of any diffusers scheduler (the reference a parallel sampler must
match).

Example:
    >>> cfg = DDPMConfig(block_out_channels=(32, 64, 64), layers_per_block=1, attention=False)
    >>> unet, sched = build_ddpm(cfg), ddpm_scheduler(cfg)
    >>> eps = unet(torch.zeros(4, 1, 28, 28), torch.tensor([999] * 4)).sample  # (4, 1, 28, 28)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.errors import CheckpointError, ConfigError, FFSolveError

__all__ = [
    "DDPMConfig",
    "DiffusersMissingError",
    "build_ddpm",
    "ddpm_scheduler",
    "load_ddpm",
    "sample_ddpm",
    "save_ddpm",
]


class DiffusersMissingError(FFSolveError, ImportError):
    """diffusers is not installed (the command line prints this as one line)."""


def _diffusers() -> Any:
    """The diffusers module, imported on first use."""
    try:
        import diffusers
    except ImportError as e:
        raise DiffusersMissingError(
            f"DDPM models need diffusers ({e}): pip install -e .[diffusion]"
        ) from None
    return diffusers


@dataclass(frozen=True)
class DDPMConfig(Config):
    """A DDPM's UNet and its noise schedule.

    Attributes:
        image_size: H = W of the images (28); divisible by 2 ** (levels - 1).
        channels: image channels (1).
        block_out_channels: channels of each resolution level (at most 3 levels at 28x28).
        layers_per_block: ResNet blocks per level (the up path has one more, as diffusers).
        attention: self-attention in every level but the first, and in the middle block.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups; divides every entry of block_out_channels.
        dropout: in the ResNet blocks.
        num_train_timesteps: T of the forward process.
        beta_start, beta_end: the linear beta schedule (the paper's 1e-4 and 0.02).
        seed: the initial weights come from this seed.
    """

    image_size: int = spec(28, ge=4)
    channels: int = spec(1, ge=1)
    block_out_channels: tuple[int, ...] = spec((64, 128, 128), ge=1)
    layers_per_block: int = spec(2, ge=1)
    attention: bool = True
    attention_head_dim: int = spec(8, ge=1)
    norm_num_groups: int = spec(32, ge=1)
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    num_train_timesteps: int = spec(1000, ge=2)
    beta_start: float = spec(1e-4, gt=0.0, lt=1.0)
    beta_end: float = spec(0.02, gt=0.0, lt=1.0)
    seed: int = spec(0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ConfigError("DDPMConfig.block_out_channels needs at least one level")
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(
                f"DDPMConfig: image_size {self.image_size} is not divisible by "
                f"2 ** {levels - 1} ({levels} levels); use fewer levels or pad the images"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"DDPMConfig: norm_num_groups {self.norm_num_groups} does not divide the "
                f"channels {bad} of block_out_channels"
            )
        if self.beta_start >= self.beta_end:
            raise ConfigError(
                f"DDPMConfig: beta_start {self.beta_start} must be below beta_end {self.beta_end}"
            )


def build_ddpm(cfg: DDPMConfig) -> Any:
    """A freshly initialised `diffusers.UNet2DModel` (from `cfg.seed`), in train mode.

    Its forward is `unet(x, t).sample`: x (B, C, H, W) noisy images, t (B,) or a scalar of
    integer timesteps -> (B, C, H, W) predicted noise.
    """
    diffusers = _diffusers()
    levels = len(cfg.block_out_channels)
    down = tuple(
        "AttnDownBlock2D" if cfg.attention and i > 0 else "DownBlock2D" for i in range(levels)
    )
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    devices = (
        [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):  # seeded weights, global RNG untouched
        torch.manual_seed(cfg.seed)
        unet = diffusers.UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=cfg.channels,
            out_channels=cfg.channels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            add_attention=cfg.attention,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            dropout=cfg.dropout,
        )
    return unet


def ddpm_scheduler(cfg: DDPMConfig) -> Any:
    """The `diffusers.DDPMScheduler` the model was trained with: linear betas, epsilon
    prediction, samples clipped to [-1, 1]. `DDIMScheduler.from_config(s.config)` gives the
    matching DDIM sampler."""
    diffusers = _diffusers()
    return diffusers.DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def save_ddpm(
    path: str | Path,
    unet: torch.nn.Module,
    cfg: DDPMConfig,
    extra: dict[str, Any] | None = None,
    storage_dtype: str = "float32",
) -> Path:
    """Save the UNet's weights (safetensors) and `cfg` (JSON sidecar), kind "ddpm";
    `storage_dtype="float16"` halves the file (loaded back as float32). Atomic."""
    return save_checkpoint(
        path, "ddpm", unet.state_dict(), config_to_dict(cfg), extra, storage_dtype=storage_dtype
    )


class _DropFloat32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextlib.contextmanager
def _quiet_dtype_cast(unet: Any) -> Iterator[None]:
    """diffusers' `ModelMixin.to` logs "There are modules in UNet2DModel that should be kept
    in float32: []" on every dtype cast, also when the model keeps none (it tests the list
    `is not None`; diffusers 0.42). Drop that one message, on its logger, for this cast and a
    model that keeps no module in float32; any other message, or a real list, still shows."""
    if getattr(unet, "_keep_in_fp32_modules", None):
        yield
        return
    log = logging.getLogger("diffusers.models.modeling_utils")
    notice = _DropFloat32Notice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


def load_ddpm(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Any, DDPMConfig, dict[str, Any]]:
    """Load a DDPM checkpoint; returns (UNet2DModel in eval mode, its config, metadata),
    on `device`, its weights cast to `dtype` (default: as stored, float32).

    Raises:
        CheckpointError: missing, corrupted, not a "ddpm" checkpoint, or weights that do not
            fit the config (the message names the path).
        DiffusersMissingError: diffusers is not installed.
    """
    tensors, meta = load_checkpoint(path, "ddpm", device="cpu")
    raw = meta.get("config")
    try:
        if not isinstance(raw, dict):
            raise TypeError("no config mapping")
        fields = {f.name for f in dataclasses.fields(DDPMConfig)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise TypeError(f"unknown config field(s) {', '.join(unknown)}")
        values = dict(raw)
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        cfg = DDPMConfig(**values)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{path} holds no valid DDPM config: {e}") from None
    unet = build_ddpm(cfg)
    try:
        unet.load_state_dict(tensors, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match its DDPM config: {first}") from None
    unet = unet.to(device)
    if dtype is not None:
        with _quiet_dtype_cast(unet):
            unet = unet.to(dtype)
    return unet.eval(), cfg, meta


@torch.no_grad()
def sample_ddpm(
    unet: Any,
    scheduler: Any,
    num: int,
    generator: torch.Generator,
    num_inference_steps: int | None = None,
    batch: int | None = None,
) -> Tensor:
    """Sample `num` images with the plain sequential loop of a diffusers scheduler.

    Args:
        unet: the denoiser (eval mode); its device is used.
        scheduler: a `DDPMScheduler` (1000 steps: ancestral sampling as in the paper) or a
            `DDIMScheduler` built from its config (fewer steps, eta 0: deterministic).
        num: images to draw.
        generator: a CPU generator; the initial noise and every step's noise come from it.
        num_inference_steps: default the scheduler's `num_train_timesteps`.
        batch: images per UNet call (default all at once).

    Returns:
        (num, C, H, W) float32 images in [-1, 1], on the CPU.
    """
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    device = next(unet.parameters()).device
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    out = []
    for i in range(0, num, batch or num):
        n = min(batch or num, num - i)
        x = torch.randn((n, *shape), generator=generator).to(device)  # (n, C, H, W)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            eps = unet(x, t.to(device)).sample  # (n, C, H, W) predicted noise
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)
