"""Figures drawn from saved records only (so `ffsolve plot RUN_DIR` can redraw them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["mosaic", "plot_curves", "plot_traces", "plt", "save_figure", "show_images"]


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay the figure out, write it to `path`, close it; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_traces(
    records: Sequence[dict[str, Any]], path: Path, title: str = "", length: int | None = None
) -> Path:
    """Two panels per run: forward difference vs iteration (log) and certified prefix."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in records:
        tr = r.get("traces") or {}
        res, cert = tr.get("residuals"), tr.get("certified")
        if res:
            its = range(1, len(res) + 1)
            ax1.semilogy(its, [max(v, 1e-18) for v in res], label=r["method"])
        if cert:
            ax2.plot(range(1, len(cert) + 1), cert, label=r["method"])
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("max |x^k - x^{k-1}| (floored at 1e-18)")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("certified prefix (positions)")
    if length:
        ax2.axhline(length, color="gray", lw=0.5)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def mosaic(images: Sequence, cols: int) -> tuple[Any, str | None]:
    """uint8 images (n, H, W) or (n, H, W, 3) as nested lists or an array -> one tiled image
    (rows * H, cols * W[, 3]) and the colour map to show it with (grey for one channel)."""
    import numpy as np

    arr = np.asarray(images, dtype=np.uint8)  # (n, H, W[, C])
    n = len(arr)
    rows = -(-n // cols)
    pad = np.zeros((rows * cols - n, *arr.shape[1:]), np.uint8)
    arr = np.concatenate([arr, pad])
    arr = arr.reshape(rows, cols, *arr.shape[1:])  # (rows, cols, H, W[, C])
    arr = np.swapaxes(arr, 1, 2)  # (rows, H, cols, W[, C])
    tiled = arr.reshape(rows * arr.shape[1], cols * arr.shape[3], *arr.shape[4:])
    return tiled, ("gray" if tiled.ndim == 2 else None)


def show_images(ax: Any, images: Sequence, cols: int, title: str = "") -> None:
    """Draw uint8 images tiled `cols` wide on `ax`, without axes."""
    tiled, cmap = mosaic(images, cols)
    ax.imshow(tiled, cmap=cmap, vmin=0, vmax=255)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def plot_curves(
    panels: Sequence[tuple[str, str, bool]],
    series: Sequence[dict[str, Any]],
    path: Path,
    xlabel: str,
    title: str = "",
    vlines: Sequence[tuple[float, str]] = (),
) -> Path:
    """One panel per (key, ylabel, log-scale) of `panels`; each series is a dict with
    'label', 'x' (a list) and one list per panel key (None entries are skipped); `vlines`
    are (x, label) reference marks drawn on every panel (e.g. a baseline's time)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, ylabel, log) in zip(axes[0], panels, strict=True):
        for s in series:
            pts = [(x, y) for x, y in zip(s["x"], s[key], strict=True) if y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if log:
                ax.semilogy(xs, [max(y, 1e-18) for y in ys], label=s["label"])
            else:
                ax.plot(xs, ys, label=s["label"])
        for i, (x, label) in enumerate(vlines):
            ax.axvline(x, ls="--", lw=0.8, color=f"C{(i + 5) % 10}", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
