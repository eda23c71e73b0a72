"""MADE: a masked MLP whose output d depends only on the inputs before d in its ordering.

Germain, Gregor, Murray and Larochelle, "MADE: Masked Autoencoder for Distribution
Estimation" (ICML 2015). Here the output is, for every dimension, the location and the
log-scale of a logistic distribution in logit space, as in Song et al. (2021).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.config import Config, spec
from ffsolve.errors import CheckpointError

__all__ = ["MADE", "MADEConfig", "load_made", "save_made"]


@dataclass(frozen=True)
class MADEConfig(Config):
    dims: int = spec(784, ge=2)  # D, data dimensions
    hidden: tuple[int, ...] = spec((512, 512), ge=1)
    natural_ordering: bool = True  # False: a random ordering from the seed
    seed: int = spec(0, ge=0)  # masks (hidden degrees, ordering) come from this seed
    min_log_scale: float = -7.0  # floor of the logistic log-scale (keeps the density finite)


class MADE(nn.Module):
    """Masked MLP (ReLU) mapping x (B, D) to logistic (loc, log_scale), each (B, D).

    Output `ordering[t]` depends only on inputs `ordering[:t]`: dimension `ordering[0]` is
    sampled first, from the biases alone.

    Degrees: input i has degree rank(i) in [0, D-1] (its place in the ordering); a hidden unit
    has a degree m in [0, D-2] drawn from a seeded generator and may see inputs or units of
    degree <= m; output i sees hidden units of degree < rank(i).

    Example:
        >>> made = MADE(MADEConfig(dims=784))
        >>> loc, log_scale = made(torch.zeros(8, 784))
    """

    def __init__(self, config: MADEConfig) -> None:
        super().__init__()
        self.config = config
        D = config.dims
        if D < 2:
            raise ValueError(f"MADE needs at least 2 dimensions, got {D}")
        if not config.hidden or min(config.hidden) < 1:
            raise ValueError(f"MADE needs at least one hidden layer of size >= 1: {config.hidden}")
        g = torch.Generator().manual_seed(config.seed)
        ordering = torch.arange(D) if config.natural_ordering else torch.randperm(D, generator=g)
        rank = torch.empty(D, dtype=torch.long)
        rank[ordering] = torch.arange(D)  # rank[i]: step at which dimension i is sampled
        degrees = [rank]
        for h in config.hidden:
            # Sorted so that the units of degree < d form a prefix (used by fast samplers).
            degrees.append(torch.randint(0, D - 1, (h,), generator=g).sort().values)
        self.register_buffer("ordering", ordering)
        self.layers = nn.ModuleList()
        for i, (prev, cur) in enumerate(zip(degrees[:-1], degrees[1:], strict=True)):
            self.layers.append(nn.Linear(len(prev), len(cur)))
            self.register_buffer(f"mask{i}", (cur[:, None] >= prev[None, :]))  # bool
        out_mask = rank[:, None] > degrees[-1][None, :]  # (D, H_last) bool
        self.head = nn.Linear(len(degrees[-1]), 2 * D)  # rows: D locations then D log-scales
        self.register_buffer("mask_head", torch.cat([out_mask, out_mask]))
        for i, deg in enumerate(degrees[1:]):
            self.register_buffer(f"degree{i}", deg)

    @property
    def dims(self) -> int:
        return self.config.dims

    def masks(self) -> list[Tensor]:
        """The masks of the hidden layers then the head, (out, in) each."""
        return [getattr(self, f"mask{i}") for i in range(len(self.layers))] + [self.mask_head]

    def degrees(self) -> list[Tensor]:
        """The (sorted) degrees of each hidden layer's units."""
        return [getattr(self, f"degree{i}") for i in range(len(self.layers))]

    def hidden(self, x: Tensor) -> Tensor:
        """The last hidden layer, (B, H_last), for inputs x (B, D)."""
        h = x
        for i, lin in enumerate(self.layers):
            h = F.relu(F.linear(h, lin.weight * getattr(self, f"mask{i}"), lin.bias))
        return h

    def head_rows(self, h: Tensor, dims: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loc, log_scale) for the dimensions `dims` (all when None), each (B, len(dims))."""
        w = self.head.weight * self.mask_head  # (2D, H)
        b = self.head.bias
        D = self.dims
        if dims is not None:
            rows = torch.cat([dims, dims + D])
            w, b = w.index_select(0, rows), b.index_select(0, rows)
            D = len(dims)
        out = F.linear(h, w, b)  # (B, 2 * len(dims))
        loc, log_scale = out[:, :D], out[:, D:]
        return loc, log_scale.clamp(min=self.config.min_log_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, log_scale) of every dimension, each (B, D)."""
        return self.head_rows(self.hidden(x))

    def log_prob(self, z: Tensor) -> Tensor:
        """Logistic log-density of z (B, D) in logit space, summed over dimensions: (B,)."""
        loc, log_scale = self(z)
        u = (z - loc) * torch.exp(-log_scale)
        return (-u - log_scale - 2 * F.softplus(-u)).sum(1)


def save_made(
    path: str | Path,
    model: MADE,
    extra: dict[str, Any] | None = None,
    storage_dtype: str = "float32",
) -> Path:
    """Save weights, masks, degrees and ordering (safetensors) with the config (JSON);
    `storage_dtype="float16"` halves the file (loaded back as float32)."""
    config = dataclasses.asdict(model.config)
    config["hidden"] = list(config["hidden"])
    return save_checkpoint(
        path, "made", model.state_dict(), config, extra, storage_dtype=storage_dtype
    )


def load_made(
    path: str | Path, device: torch.device | str = "cpu", *, require: Sequence[str] = ()
) -> tuple[MADE, dict]:
    """Load a MADE checkpoint (masks as saved); returns (model in eval mode, metadata).

    `require`: sidecar fields the caller reads, e.g. ("data.lam", "data.shape"); a missing or
    bad one is a CheckpointError naming the file and the field (see `check_sidecar`).
    """
    tensors, meta = load_checkpoint(path, "made", device="cpu", require=require)
    cfg = dict(meta["config"])
    try:
        cfg["hidden"] = tuple(cfg["hidden"])
        model = MADE(MADEConfig(**cfg))
        model.load_state_dict(tensors, strict=True)
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match its MADE config: {e}") from None
    return model.to(device).eval(), meta
