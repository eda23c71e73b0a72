"""`ffsolve train made`: maximum likelihood for MADE on dequantised, logit-transformed pixels."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ffsolve.data import bits_per_dim, dequantize_logit, load_images
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.made import MADE, MADEConfig, save_made


@dataclass(frozen=True)
class MADETrainConfig:
    data: str = "mnist"  # mnist | rgb (crops of natural photos) | cifar10 (needs data_dir)
    data_dir: str | None = None
    hidden: tuple[int, ...] = (512, 512)
    natural_ordering: bool = True
    lam: float = 1e-6  # logit transform: 1e-6 for MNIST, 0.05 for RGB
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    lr_final: float = 1e-4  # cosine decay to this
    max_train: int | None = None  # use only the first N training images (quick runs)
    max_test: int | None = None
    rgb_train: int = 50000  # crops in the RGB stand-in
    rgb_test: int = 10000
    seed: int = 0
    save_to: str | None = None  # checkpoint path (stem); default <run dir>/made


def _flat(images: np.ndarray, limit: int | None) -> torch.Tensor:
    x = torch.from_numpy(images[:limit] if limit else images)
    return x.reshape(len(x), -1).float()  # (N, D) pixel values 0..255, (H, W[, C]) raster


@torch.no_grad()
def evaluate_bpd(
    model: MADE, x: torch.Tensor, lam: float, device: torch.device, seed: int = 1234
) -> float:
    """Test bits/dim (one dequantisation sample per image, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(x), 1000):
        xb = x[i : i + 1000]
        u = torch.rand(xb.shape, generator=g)
        z, logdet = dequantize_logit(xb.to(device), lam, u.to(device))
        total += float(bits_per_dim(model.log_prob(z), logdet, x.shape[1]).sum())
        n += len(xb)
    return total / n


def train(cfg: MADETrainConfig, ctx: RunContext) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    kw = {"num_train": cfg.rgb_train, "num_test": cfg.rgb_test, "seed": cfg.seed}
    data = load_images(cfg.data, cfg.data_dir, **(kw if cfg.data == "rgb" else {}))
    shape = list(data["train"][0].shape[1:])
    x_train, x_test = _flat(data["train"][0], cfg.max_train), _flat(data["test"][0], cfg.max_test)
    D = x_train.shape[1]
    model_cfg = MADEConfig(
        dims=D, hidden=cfg.hidden, natural_ordering=cfg.natural_ordering, seed=cfg.seed
    )
    model = MADE(model_cfg).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"MADE {D} dims, hidden {cfg.hidden}, {n_params / 1e6:.2f}M parameters; "
        f"{len(x_train)} train / {len(x_test)} test images ({cfg.data})"
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps, eta_min=cfg.lr_final)
    g = torch.Generator().manual_seed(cfg.seed)
    model.eval()
    history = [
        {
            "epoch": 0,
            "train_bpd": None,
            "elapsed_s": 0.0,
            "test_bpd": evaluate_bpd(model, x_test, cfg.lam, ctx.device),
        }
    ]
    ctx.log(f"  epoch   0 (initial)  test {history[0]['test_bpd']:.4f} bits/dim")
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        losses = []
        for i in range(0, len(x_train), cfg.batch_size):
            xb = x_train[perm[i : i + cfg.batch_size]]
            u = torch.rand(xb.shape, generator=g)
            z, logdet = dequantize_logit(xb.to(ctx.device), cfg.lam, u.to(ctx.device))
            loss = bits_per_dim(model.log_prob(z), logdet, D).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        test = evaluate_bpd(model, x_test, cfg.lam, ctx.device)
        train_bpd = float(np.mean(losses))
        history.append(
            {
                "epoch": epoch,
                "train_bpd": train_bpd,
                "test_bpd": test,
                "elapsed_s": time.perf_counter() - t0,
            }
        )
        ctx.log(
            f"  epoch {epoch:3d}/{cfg.epochs}  train {train_bpd:.4f}  test {test:.4f} bits/dim"
            f"  ({time.perf_counter() - t0:.0f} s)"
        )
    path = cfg.save_to or str(ctx.out_dir / "made")
    extra = {
        "data": {"name": cfg.data, "shape": shape, "lam": cfg.lam},
        "test_bits_per_dim": history[-1]["test_bpd"],
        "epochs": cfg.epochs,
    }
    saved = save_made(path, model.cpu(), extra)
    ctx.log(f"checkpoint: {saved}")
    return {
        "history": history,
        "checkpoint": str(saved),
        "num_params": n_params,
        "test_bits_per_dim": extra["test_bits_per_dim"],
    }


def summary(records: dict[str, Any]) -> str:
    h = records["history"]
    return (
        f"test {h[-1]['test_bpd']:.4f} bits/dim after {h[-1]['epoch']} epochs "
        f"({h[-1]['elapsed_s']:.0f} s); checkpoint {records['checkpoint']}"
    )


register_trainer(
    Trainer(
        name="made",
        description="MADE on MNIST or RGB images (logistic in logit space); saves a checkpoint",
        config=MADETrainConfig,
        train=train,
        summary=summary,
    )
)
