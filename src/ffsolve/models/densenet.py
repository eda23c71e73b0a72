"""DenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2017) in plain PyTorch.

The module tree and parameter names are those of torchvision's `densenet121/169/201`, so a
torchvision state dict loads as it is (`load_torchvision_state_dict`); torchvision itself is
not needed (it does not import beside the CPU torch on these machines).

    features.conv0 / norm0 / relu0 / pool0           the stem
    features.denseblock{b}.denselayer{l}.norm1 / conv1 / norm2 / conv2
    features.transition{b}.norm / conv / pool          between blocks
    features.norm5, classifier                         the head

Dense layer l of a block reads the concatenation of the block input and the l - 1 earlier
layers' outputs (c0 + (l - 1) k channels) and returns k new channels:
    BN -> ReLU -> 1x1 conv (bn_size k) -> BN -> ReLU -> 3x3 conv (k).
The model exposes `stem`, `dense_blocks`, `transitions` and `head` so that a problem adapter
can evaluate the layers in any order; the model itself knows nothing about solvers.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.errors import CheckpointError

__all__ = [
    "DenseNet",
    "DenseNetConfig",
    "densenet_bc",
    "densenet_config",
    "load_densenet",
    "load_torchvision_state_dict",
    "save_densenet",
]


@dataclass(frozen=True)
class DenseNetConfig:
    """Hyper-parameters of a DenseNet (torchvision's names).

    Attributes:
        growth_rate: k, channels each dense layer adds.
        block_config: dense layers per block.
        num_init_features: channels out of the stem.
        bn_size: bottleneck width factor (the 1x1 conv has bn_size * k channels).
        compression: transition output channels = floor(compression * input channels).
        num_classes: classifier outputs.
        in_channels: image channels (3 for ImageNet, 1 for MNIST-like data).
        small_input: stem = 3x3 conv, stride 1, no max-pool (28x28 or 32x32 images); otherwise
            the ImageNet stem (7x7 stride 2 conv, 3x3 stride 2 max-pool).
    """

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    num_classes: int = 1000
    in_channels: int = 3
    small_input: bool = False

    def __post_init__(self) -> None:
        if self.growth_rate < 1 or self.num_init_features < 1 or self.bn_size < 1:
            raise ValueError(f"growth_rate, num_init_features, bn_size must be >= 1: {self}")
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"block_config needs blocks of >= 1 layer, got {self.block_config}")
        if not 0 < self.compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")


_IMAGENET = {
    "densenet121": ((6, 12, 24, 16), 32, 64),
    "densenet169": ((6, 12, 32, 32), 32, 64),
    "densenet201": ((6, 12, 48, 32), 32, 64),
    "densenet161": ((6, 12, 36, 24), 48, 96),
}


def densenet_config(arch: str, **overrides: Any) -> DenseNetConfig:
    """torchvision's ImageNet configurations by name (densenet121/161/169/201)."""
    if arch not in _IMAGENET:
        raise ValueError(f"unknown DenseNet {arch!r}; valid: {', '.join(_IMAGENET)}")
    blocks, k, init = _IMAGENET[arch]
    return DenseNetConfig(growth_rate=k, block_config=blocks, num_init_features=init, **overrides)


def densenet_bc(
    depth: int = 100,
    growth_rate: int = 12,
    num_classes: int = 10,
    in_channels: int = 1,
    compression: float = 0.5,
) -> DenseNetConfig:
    """DenseNet-BC for small images (Huang et al. Sec. 4): three blocks of (depth - 4) / 6
    bottleneck layers, 2k stem channels, the small-input stem."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    return DenseNetConfig(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate,
        compression=compression,
        num_classes=num_classes,
        in_channels=in_channels,
        small_input=True,
    )


class _DenseLayer(nn.Module):
    """(B, c_in, H, W) concatenated features -> (B, k, H, W) new features."""

    def __init__(self, c_in: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.relu1(self.norm1(x)))  # (B, bn_size k, H, W)
        return self.conv2(self.relu2(self.norm2(h)))  # (B, k, H, W)


class _DenseBlock(nn.ModuleDict):
    """L dense layers; forward returns the concatenation (B, c0 + L k, H, W)."""

    def __init__(self, num_layers: int, c0: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(c0 + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in self.values():
            feats.append(layer(torch.cat(feats, 1)))  # as torchvision: one cat per layer
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """DenseNet with torchvision's parameter names.

    Args:
        config: a `DenseNetConfig` (see `densenet_config`, `densenet_bc`).

    Example:
        >>> net = DenseNet(densenet_config("densenet201")).eval()
        >>> logits = net(torch.randn(1, 3, 224, 224))  # (1, 1000)
    """

    def __init__(self, config: DenseNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config.num_init_features
        if config.small_input:
            stem = [
                ("conv0", nn.Conv2d(config.in_channels, c, 3, padding=1, bias=False)),
                ("norm0", nn.BatchNorm2d(c)),
                ("relu0", nn.ReLU(inplace=True)),
            ]
        else:
            stem = [
                ("conv0", nn.Conv2d(config.in_channels, c, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(c)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        self.num_stem = len(stem)
        self.block_inputs: list[int] = []  # c0 of each block
        for i, n in enumerate(config.block_config):
            self.block_inputs.append(c)
            block = _DenseBlock(n, c, config.growth_rate, config.bn_size)
            self.features.add_module(f"denseblock{i + 1}", block)
            c = c + n * config.growth_rate
            if i != len(config.block_config) - 1:
                c_out = int(c * config.compression)
                self.features.add_module(f"transition{i + 1}", _Transition(c, c_out))
                c = c_out
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, config.num_classes)
        self.num_features = c
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    # --- the pieces a layered problem evaluates ------------------------------------------
    @property
    def num_layers(self) -> int:
        """T, the number of dense layers (98 for DenseNet-201)."""
        return sum(self.config.block_config)

    def dense_blocks(self) -> list[_DenseBlock]:
        return [getattr(self.features, f"denseblock{i + 1}") for i in range(len(self.block_inputs))]

    def transitions(self) -> list[_Transition]:
        return [
            getattr(self.features, f"transition{i + 1}") for i in range(len(self.block_inputs) - 1)
        ]

    def stem(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) images -> (B, num_init_features, H', W') input of block 1."""
        for i in range(self.num_stem):
            x = self.features[i](x)
        return x

    def head(self, feats: Tensor) -> Tensor:
        """(B, C, h, w) output of the last dense block -> (B, num_classes) logits."""
        h = F.relu(self.features.norm5(feats))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, num_classes) logits: the sequential forward."""
        return self.head(self.features[:-1](x))


# --- torchvision state dicts -----------------------------------------------------------

# Old torchvision checkpoints (the published .pth files) name layers "norm.1", "conv.2", ...
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_old(key: str) -> str:
    m = _OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def load_torchvision_state_dict(model: DenseNet, state_dict: Mapping[str, Tensor]) -> None:
    """Load a torchvision DenseNet state dict into `model` (both key spellings).

    BatchNorm's `num_batches_tracked` counters may be absent (old checkpoints); every other
    key must match in name and shape. The first wrong key is named in the error.

    Raises:
        CheckpointError: a key is missing, unexpected, or has the wrong shape.
    """
    sd = {_rename_old(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    for key, value in own.items():  # module order: the first wrong key is the earliest one
        if key not in sd:
            if key.endswith("num_batches_tracked"):
                continue
            raise CheckpointError(f"state dict lacks {key!r} (expected shape {tuple(value.shape)})")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"state dict key {key!r} has shape {tuple(sd[key].shape)}, the model expects "
                f"{tuple(value.shape)}"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(f"state dict has a key the model lacks: {extra[0]!r}")
    model.load_state_dict(sd, strict=False)  # only absent num_batches_tracked are left as is


def save_densenet(path: str | Path, model: DenseNet, extra: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors) and the config (JSON sidecar), kind "densenet"."""
    config = dataclasses.asdict(model.config)
    config["block_config"] = list(config["block_config"])
    return save_checkpoint(path, "densenet", model.state_dict(), config, extra)


def load_densenet(
    path: str | Path, device: torch.device | str = "cpu", *, require: Sequence[str] = ()
) -> tuple[DenseNet, dict[str, Any]]:
    """Load a DenseNet checkpoint; returns (model in eval mode, metadata).

    `require`: sidecar fields the caller reads, e.g. ("data.mean", "data.std") (see
    `check_sidecar`).
    """
    tensors, meta = load_checkpoint(path, "densenet", device="cpu", require=require)
    cfg = dict(meta["config"])
    try:
        cfg["block_config"] = tuple(cfg["block_config"])
        model = DenseNet(DenseNetConfig(**cfg))
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} holds no valid DenseNet config: {e}") from None
    load_torchvision_state_dict(model, tensors)
    return model.to(device).eval(), meta
