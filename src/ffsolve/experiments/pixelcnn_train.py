"""`ffsolve train pixelcnnpp`: maximum likelihood for PixelCNN++ on 8-bit images.

Loss: the discretised logistic mixture likelihood, reported in bits per dimension (of the
8-bit pixel space, so comparable with published PixelCNN++ numbers on the same data). Adam
with the paper's exponential learning-rate decay per step; optional bfloat16 autocast on CUDA.
A time budget (`max_minutes`) ends training after the batch that crosses it, so a run fits a
fixed slot on a GPU; the state is saved every `save_every_minutes` and at the end, and a run
started with `resume: true` continues from the last save (weights, optimiser, schedule,
data order, history), so an interrupted run loses at most the minutes since that save.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.checkpoint import check_training_output, train_state_path
from ffsolve.config import Config, spec
from ffsolve.data import load_images
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.pixelcnnpp import (
    PixelCNNpp,
    PixelCNNppConfig,
    load_pixelcnnpp,
    mixture_nll,
    save_pixelcnnpp,
)
from ffsolve.training import Fit, Loop, Task, exponential, fit, shuffled_batches


@dataclass(frozen=True)
class PixelCNNTrainConfig(Config):
    """Training of a PixelCNN++ (paper: 5 resnets, 40 filters MNIST, 160 filters CIFAR-10).

    Attributes:
        data: mnist, rgb (32x32 crops of natural photos: a CIFAR-shaped stand-in, not
            CIFAR-10) or cifar10 (needs data_dir).
        filters, resnets, mixtures, dropout: the model (`PixelCNNppConfig`).
        epochs: at most this many epochs; `max_minutes` may end training earlier.
        max_minutes: wall-clock budget of the training loop (0: none).
        lr, lr_decay: Adam's learning rate, multiplied by lr_decay after every step.
        amp: bfloat16 autocast for the network on CUDA (the loss stays float32).
        save_every_minutes: periodic save of the resumable state (0: only at the end).
        resume: continue from `<save_to>.resume.pt` when it exists (the command line's
            `--resume` sets it and insists on one; an existing checkpoint is otherwise kept
            unless `--force`).
        storage_dtype: float32 or float16 weights in the shipped checkpoint (test bits/dim is
            re-measured with the stored, rounded weights).
        max_train, max_test: use only the first N images (quick runs).
    """

    data: str = spec("mnist", choices=("mnist", "rgb", "cifar10"))
    data_dir: str | None = None
    filters: int = spec(40, ge=1)
    resnets: int = spec(5, ge=1)
    mixtures: int = spec(10, ge=1)
    dropout: float = spec(0.5, ge=0.0, lt=1.0)
    epochs: int = spec(100, ge=1)
    max_minutes: float = spec(0.0, ge=0.0)
    batch_size: int = spec(64, ge=1)
    lr: float = spec(1e-3, gt=0.0)
    lr_decay: float = spec(0.999995, gt=0.0, le=1.0)
    amp: bool = True
    save_every_minutes: float = spec(5.0, ge=0.0)
    resume: bool = False
    save_to: str | None = None
    storage_dtype: str = spec("float32", choices=("float32", "float16"))
    max_train: int | None = spec(None, ge=1)
    max_test: int | None = spec(None, ge=1)
    eval_batch: int = spec(500, ge=1)
    rgb_train: int = spec(50000, ge=1)
    rgb_test: int = spec(10000, ge=1)
    rgb_photos: int = spec(11, ge=1)  # the stand-in is made of this many photos, or refused
    seed: int = spec(0, ge=0)


def _images(x: np.ndarray, limit: int | None) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> uint8 (N, C, H, W)."""
    x = x[:limit] if limit else x
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def to_unit(xb: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1], bins of width 2/255 centred on the pixel values."""
    return xb.float() / 127.5 - 1.0


def evaluate_bpd(
    model: PixelCNNpp, x: torch.Tensor, batch: int, device: torch.device, amp: bool = False
) -> float:
    """Test bits per dimension of uint8 images x (N, C, H, W), in eval mode."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = to_unit(x[i : i + batch].to(device))
            with torch.autocast(device.type, torch.bfloat16, enabled=amp and device.type == "cuda"):
                params = model(xb)
            total += float(mixture_nll(params, xb, model.config.mixtures).sum())
    return total / (len(x) * x[0].numel() * math.log(2.0))


def train(cfg: PixelCNNTrainConfig, ctx: RunContext) -> dict[str, Any]:
    save_to = cfg.save_to or str(ctx.out_dir / "pixelcnnpp")
    # --resume insists on a resume state; the config's `resume` continues one when present
    resume = cfg.resume or ctx.resume
    continues = cfg.resume and train_state_path(save_to).is_file()
    check_training_output(
        save_to, named=cfg.save_to is not None, force=ctx.force or continues, resume=ctx.resume
    )
    torch.manual_seed(cfg.seed)
    dev = ctx.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    kw = {"num_train": cfg.rgb_train, "num_test": cfg.rgb_test, "seed": cfg.seed,
          "photos": cfg.rgb_photos}  # fmt: skip
    data = load_images(cfg.data, cfg.data_dir, **(kw if cfg.data == "rgb" else {}))
    x_train = _images(data["train"][0], cfg.max_train).to(dev)  # uint8 on the device
    x_test = _images(data["test"][0], cfg.max_test)
    C, H, W = x_train.shape[1:]
    model_cfg = PixelCNNppConfig(
        channels=C,
        height=H,
        width=W,
        filters=cfg.filters,
        resnets=cfg.resnets,
        mixtures=cfg.mixtures,
        dropout=cfg.dropout,
    )
    model = PixelCNNpp(model_cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"PixelCNN++ {C}x{H}x{W} ({cfg.data}), {cfg.filters} filters, {cfg.resnets} resnets, "
        f"{n_params / 1e6:.2f}M parameters; {len(x_train)} train / {len(x_test)} test images"
    )
    amp = cfg.amp and dev.type == "cuda"
    dims = C * H * W

    def loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = to_unit(x_train[idx])
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            params = model(xb)
        return mixture_nll(params, xb, cfg.mixtures).mean() / (dims * math.log(2.0))

    def evaluate(m: PixelCNNpp) -> dict[str, float]:
        return {"test_bpd": evaluate_bpd(m, x_test, cfg.eval_batch, dev, amp)}

    def save(run: Fit, final: bool) -> Path:
        stored_bpd = run.final["test_bpd"]
        if cfg.storage_dtype == "float16":  # measure what ships: the float16-rounded weights
            rounded = copy.deepcopy(model)
            with torch.no_grad():
                for p in rounded.parameters():
                    p.copy_(p.half().float())
            stored_bpd = evaluate(rounded)["test_bpd"]
            ctx.log(f"  test with float16-stored weights: {stored_bpd:.4f} bits/dim")
        run.final["stored_bpd"] = stored_bpd
        extra = {
            "data": {"name": cfg.data, "shape": [C, H, W]},
            "test_bits_per_dim": stored_bpd,
            "epochs": run.epoch,
            "steps": run.step,
            "train_seconds": run.elapsed_s,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }
        return save_pixelcnnpp(save_to, copy.deepcopy(model).cpu(), extra, cfg.storage_dtype)

    task = Task(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        lr=exponential(cfg.lr, cfg.lr_decay),  # the paper's decay per step
        plan=shuffled_batches(len(x_train), cfg.batch_size, dev),
        loss=loss,
        evaluate=evaluate,
        save=save,
        load=lambda p: load_pixelcnnpp(p, dev)[0],
        test_key="test_bpd",
        train_key="train_bpd",
        steps_per_epoch=math.ceil(len(x_train) / cfg.batch_size),
    )
    # the schedule does not depend on the run's length: the state is kept for --resume with
    # more epochs; a resumed run trains the same model (epochs and budget may change)
    loop = Loop(epochs=cfg.epochs, max_minutes=cfg.max_minutes,
                save_every_minutes=cfg.save_every_minutes, keep_state=True)  # fmt: skip
    same = dataclasses.asdict(model_cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    run = fit(task, loop, ctx, save_to, same=same, generator=g, resume=resume)
    ctx.log(f"checkpoint: {run.checkpoint}")
    return {
        "history": run.history,
        "checkpoint": str(run.checkpoint),
        "num_params": n_params,
        "test_bits_per_dim": run.final["stored_bpd"],
        "skipped_batches": 0,
    }


def summary(records: dict[str, Any]) -> str:
    h = records["history"]
    if not h:
        return f"no epoch ran; checkpoint {records['checkpoint']}"
    return (
        f"test {records['test_bits_per_dim']:.4f} bits/dim after {h[-1]['epoch']} epochs, "
        f"{h[-1]['step']} steps ({h[-1]['elapsed_s']:.0f} s); checkpoint {records['checkpoint']}"
    )


register_trainer(
    Trainer(
        name="pixelcnnpp",
        description="PixelCNN++ on MNIST or RGB images (discretised logistic mixture)",
        config=PixelCNNTrainConfig,
        train=train,
        summary=summary,
    )
)
