"""Runtime switches shared by every experiment: dtype names, exact arithmetic, device sync."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "dtype_of", "exact_arithmetic", "synchronize"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = tuple(DTYPES)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def exact_arithmetic(device: torch.device, cudnn_benchmark: bool | None = None) -> None:
    """No TF32 matrix products or convolutions on CUDA: every experiment checks equality with
    the sequential result, which TF32's 10-bit mantissas would break. Optionally set
    cuDNN's autotuner (it picks per-shape kernels; both sides of a comparison use it)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
