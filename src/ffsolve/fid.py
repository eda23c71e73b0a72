"""A Frechet distance between image sets on DenseNet-BC (Fashion-MNIST) features.

This is NOT the FID of the literature: that one uses Inception-v3 features of 299x299 RGB
images, which do not exist offline here and do not suit 28x28 grey images. The features are
the penultimate layer (after the last BatchNorm, ReLU and global average pooling, D = 342) of
the shipped DenseNet-BC-100 classifier `checkpoints/densenet_bc_fmnist`, trained on
Fashion-MNIST. The Frechet distance itself is the usual one,

    FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),

between Gaussians fitted to the two feature sets. Numbers are comparable only with numbers
made the same way (same classifier, same sample counts: the estimate is biased upward for
small sets), and on MNIST the classifier sees digits it was never trained on.

Example:
    >>> net = load_feature_net()                           # the shipped DenseNet-BC
    >>> fa = features(net, samples)                        # (N, 342); samples in [-1, 1]
    >>> fb = features(net, test_images_uint8)
    >>> print(fid(fa, fb))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.models.densenet import DenseNet, load_densenet

__all__ = ["FID_CHECKPOINT", "FeatureNet", "features", "fid", "fid_of_samples", "load_feature_net"]

#: The classifier whose penultimate layer gives the features.
FID_CHECKPOINT = "checkpoints/densenet_bc_fmnist"


class FeatureNet(nn.Module):
    """A DenseNet classifier with the input normalisation it was trained with.

    Args:
        net: the classifier (eval mode).
        mean, std: the pixel statistics of its training images in [0, 1] (the checkpoint's
            meta['data']['mean'] / ['std']).
    """

    def __init__(self, net: DenseNet, mean: float, std: float) -> None:
        super().__init__()
        self.net, self.mean, self.std = net.eval(), float(mean), float(std)

    @property
    def dims(self) -> int:
        """D, the feature dimension."""
        return self.net.num_features

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) images in [0, 1] -> (B, D) penultimate features."""
        h = self.net.features[:-1]((x - self.mean) / self.std)  # (B, C, h, w) last block
        h = F.relu(self.net.features.norm5(h))
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # (B, D): the classifier's input


def load_feature_net(
    path: str | Path = FID_CHECKPOINT, device: torch.device | str = "cpu"
) -> FeatureNet:
    """The feature network of `path` (default the shipped DenseNet-BC on Fashion-MNIST).

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or not a DenseNet, or its
            sidecar lacks the training images' mean and std.
    """
    net, meta = load_densenet(path, device, require=("data.mean", "data.std"))
    return FeatureNet(net, meta["data"]["mean"], meta["data"]["std"]).to(device)


def _unit(images: Tensor | np.ndarray) -> Tensor:
    """uint8 pixels (N, H, W) or (N, 1, H, W), or floats in [-1, 1] (clipped; beyond [-2, 2]
    a ValueError) -> float32 (N, 1, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # (a read-only array, e.g. a memory-mapped data set)
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floats in [-1, 1], got {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images hold NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -2 or hi > 2:  # e.g. 0..255 floats: not samples in [-1, 1]
        raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return ((x + 1) / 2).clamp(0, 1)  # an approximate sample's overshoot is clipped


@torch.no_grad()
def features(model: FeatureNet, images: Tensor | np.ndarray, batch: int = 500) -> Tensor:
    """Penultimate-layer DenseNet-BC features of `images`.

    Args:
        model: from `load_feature_net`.
        images: uint8 (N, H, W) / (N, 1, H, W) pixels, or floats in [-1, 1] (samples;
            clipped to it, and refused beyond [-2, 2], e.g. floats in 0..255).
        batch: images per forward pass.

    Returns:
        (N, D) float64 features on the CPU.
    """
    x = _unit(images)
    device = next(model.parameters()).device
    model.eval()
    out = [model(x[i : i + batch].to(device)).double().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.empty(0, model.dims, dtype=torch.float64)


def _stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(torch.as_tensor(feats).double().cpu().numpy(), dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or Inf")
    return f.mean(0), np.cov(f, rowvar=False)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2, in float64.

    S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD: the trace of its square
    root is the sum of the square roots of its eigenvalues (negatives are rounding). Two
    symmetric eigen-decompositions, no general matrix square root: pytorch-fid's
    `scipy.linalg.sqrtm(..., disp=False)` warns on SciPy 1.17 and is a TypeError once `disp`
    is removed (1.18), and the square root of the non-symmetric S1 S2 can be complex or NaN.
    """
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    m = root @ s2 @ root
    m = (m + m.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum())


def fid(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D).

    With features from `features`, this is an FID on DenseNet-BC (Fashion-MNIST) features,
    not Inception's. The square-root term comes from symmetric eigen-decompositions in
    float64 (tr sqrt(S_a S_b) = the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2)), the same with every numpy and without scipy.
    """
    mu1, s1 = _stats(feats_a)
    mu2, s2 = _stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2))
    return max(value, 0.0)  # rounding may leave -1e-12 for identical sets


def fid_of_samples(
    samples: Tensor | np.ndarray,
    reference_images: Tensor | np.ndarray,
    batch: int = 500,
    model: FeatureNet | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """DenseNet-BC FID of `samples` (floats in [-1, 1] or uint8) against `reference_images`
    (e.g. the uint8 test set), with the shipped feature network unless `model` is given."""
    model = model if model is not None else load_feature_net(device=device)
    return fid(features(model, samples, batch), features(model, reference_images, batch))
