"""`ffsolve train made`: maximum likelihood for MADE on dequantised, logit-transformed pixels."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.checkpoint import STORAGE_DTYPES, check_training_output
from ffsolve.config import Config, config_to_dict, spec
from ffsolve.data import bits_per_dim, dequantize_logit, load_images
from ffsolve.experiments import RunContext, Trainer, register_trainer
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from ffsolve.training import Fit, Loop, Task, cosine, fit, shuffled_batches


@dataclass(frozen=True)
class MADETrainConfig(Config):
    # mnist | rgb (crops of natural photos) | cifar10 (needs data_dir)
    data: str = spec("mnist", choices=("mnist", "rgb", "cifar10"))
    data_dir: str | None = None
    hidden: tuple[int, ...] = spec((512, 512), ge=1)
    natural_ordering: bool = True
    lam: float = spec(1e-6, gt=0.0, lt=0.5)  # logit transform: 1e-6 for MNIST, 0.05 for RGB
    epochs: int = spec(20, ge=1)
    batch_size: int = spec(100, ge=1)
    lr: float = spec(1e-3, gt=0.0)
    lr_final: float = spec(1e-4, ge=0.0)  # cosine decay to this
    max_train: int | None = spec(None, ge=1)  # use only the first N training images
    max_test: int | None = spec(None, ge=1)
    rgb_train: int = spec(50000, ge=1)  # crops in the RGB stand-in
    rgb_test: int = spec(10000, ge=1)
    rgb_photos: int = spec(11, ge=1)  # the stand-in is made of this many photos, or refused
    seed: int = spec(0, ge=0)
    save_to: str | None = None  # checkpoint path (stem); default <run dir>/made
    save_every: int = spec(1, ge=1)  # epochs between saves of the checkpoint and resume state
    # float16 halves the file (weights rounded; loaded as float32, test bits/dim re-measured)
    storage_dtype: str = spec("float32", choices=("float32", "float16"))


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


def _rounded(model: MADE, storage_dtype: str) -> MADE:
    """A copy with the floating weights rounded to `storage_dtype` and back (what loading a
    checkpoint stored in it gives), or the model itself for float32."""
    if storage_dtype == "float32":
        return model
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in (*out.parameters(), *out.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(STORAGE_DTYPES[storage_dtype]).float())
    return out


def train(cfg: MADETrainConfig, ctx: RunContext) -> dict[str, Any]:
    path = cfg.save_to or str(ctx.out_dir / "made")
    check_training_output(path, named=cfg.save_to is not None, force=ctx.force, resume=ctx.resume)
    torch.manual_seed(cfg.seed)
    kw = {"num_train": cfg.rgb_train, "num_test": cfg.rgb_test, "seed": cfg.seed,
          "photos": cfg.rgb_photos}  # fmt: skip
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
    extra = {"data": {"name": cfg.data, "shape": shape, "lam": cfg.lam}}

    def loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = x_train[idx]
        u = torch.rand(xb.shape, generator=g)
        z, logdet = dequantize_logit(xb.to(ctx.device), cfg.lam, u.to(ctx.device))
        return bits_per_dim(model.log_prob(z), logdet, D).mean()

    def evaluate(m: MADE) -> dict[str, float]:
        return {"test_bpd": evaluate_bpd(m.eval(), x_test, cfg.lam, ctx.device)}

    def save(run: Fit, final: bool) -> Path:
        storage = cfg.storage_dtype if final else "float32"
        kept = _rounded(model, storage)
        test = run.final["test_bpd"]
        if kept is not model:  # re-measure with the weights as they are stored
            test = evaluate_bpd(kept.eval(), x_test, cfg.lam, ctx.device)
        meta = {**extra, "test_bits_per_dim": test, "epochs": run.epoch}
        if storage != "float32":
            meta["test_bits_per_dim_float32"] = run.final["test_bpd"]
        return save_made(path, kept, meta, storage_dtype=storage)

    task = Task(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        lr=cosine(cfg.lr, cfg.lr_final),
        plan=shuffled_batches(len(x_train), cfg.batch_size),
        loss=loss,
        evaluate=evaluate,
        save=save,
        load=lambda p: load_made(p, ctx.device)[0],
        test_key="test_bpd",
        train_key="train_bpd",
        steps_per_epoch=math.ceil(len(x_train) / cfg.batch_size),
    )
    loop = Loop(epochs=cfg.epochs, save_every=cfg.save_every, checkpoint_each_save=True)
    # what must not change across a resume (save_every may)
    same = {k: v for k, v in config_to_dict(cfg).items() if k != "save_every"}
    g = torch.Generator().manual_seed(cfg.seed)
    run = fit(task, loop, ctx, path, same=same, generator=g, resume=ctx.resume)
    _, meta = load_made(path)
    ctx.log(
        f"checkpoint: {run.checkpoint} (test {meta['test_bits_per_dim']:.4f} bits/dim as stored)"
    )
    return {
        "history": run.history,
        "checkpoint": str(run.checkpoint),
        "num_params": n_params,
        "storage_dtype": cfg.storage_dtype,
        "test_bits_per_dim": meta["test_bits_per_dim"],
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
