"""`ffsolve run pixelcnn-sampling`: the paper's PixelCNN++ experiments, measured for real.

One noise draw for every method; every method stops online and is timed (median of repeats,
device synchronised) side by side with the sequential loop in the same process; every result
is compared with the sequential sample (pixels differing). The sequential loop runs the very
same full forward as a Jacobi sweep, so the two agree bitwise (see `problems.pixelcnn`).

Speed as the issue measured it: weight normalisation is folded into plain weights once,
cudnn.benchmark is on, and on CUDA the forward (plus the sampling arithmetic) is captured in a
CUDA graph that both the sequential loop and the parallel sweeps replay.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.bench import MethodSpec, compare, format_table, trace_solve
from ffsolve.config import Config, spec
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.models.pixelcnnpp import load_pixelcnnpp
from ffsolve.plots import plt, show_images
from ffsolve.problems.pixelcnn import PixelCNNSampling, pixelcnn_noise
from ffsolve.solvers import ConvergenceWarning

SEQ = "sequential"


@dataclass(frozen=True)
class PixelCNNSamplingConfig(Config):
    """The paper's settings: MNIST batch 16, 32x32 RGB batch 4.

    Attributes:
        checkpoint: a PixelCNN++ checkpoint (`ffsolve train pixelcnnpp`).
        batch, seed: the noise draw shared by every method.
        dtype: the network's dtype (bfloat16: a cheaper forward on both sides; the state and
            the sampling arithmetic stay float32).
        methods: parallel methods: jacobi, jacobi_gs (blocks = image rows), gs_jacobi (a
            sliding window of `window_rows` rows).
        atol: stopping tolerance on the [-1, 1] scale; 0 is exact equality, 0.02 the paper's
            (a change of at most 0.01 on the [0, 1] scale).
        cuda_graph: capture the forward in a CUDA graph on CUDA (both sides of every ratio).
        repeats, warmup: timed runs (median) after untimed ones.
        frames: iterations shown in the sample grids (with the sequential loop's image at
            equal wall-clock); trace: record per-iteration errors (an extra, untimed solve).
    """

    checkpoint: str = "checkpoints/pixelcnnpp_mnist"
    batch: int = spec(16, ge=1)
    seed: int = spec(0, ge=0)
    dtype: str = spec("float32", choices=("float32", "bfloat16", "float64"))
    methods: tuple[str, ...] = spec(("jacobi",), choices=("jacobi", "jacobi_gs", "gs_jacobi"))
    window_rows: int = spec(15, ge=1)
    atol: float = spec(0.0, ge=0.0)
    cuda_graph: bool = True
    cudnn_benchmark: bool = True
    repeats: int = spec(3, ge=1)
    warmup: int = spec(1, ge=0)
    trace: bool = True
    frames: tuple[int, ...] = spec((0, 10, 20, 40, 80, 160), ge=0)
    grid_images: int = spec(16, ge=1)


def _specs(cfg: PixelCNNSamplingConfig, W: int) -> list[MethodSpec]:
    table = {
        "jacobi": lambda: MethodSpec.of("jacobi", "jacobi"),
        "jacobi_gs": lambda: MethodSpec.of(f"jacobi_gs(row={W})", "jacobi_gs", block_size=W),
        "gs_jacobi": lambda: MethodSpec.of(
            f"gs_jacobi(window={cfg.window_rows} rows)", "gs_jacobi", window=cfg.window_rows * W
        ),
    }
    return [MethodSpec.of(SEQ, "sequential"), *(table[m]() for m in cfg.methods)]


def _uint8(problem: PixelCNNSampling, x: torch.Tensor, n: int) -> list:
    """States (B, H*W, C) -> the first n images as uint8 nested lists (n, H, W[, 3])."""
    img = problem.to_images(x[:n]).double()  # (n, C, H, W) in [-1, 1]
    img = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return (img[..., 0] if img.shape[-1] == 1 else img).cpu().tolist()


def run(cfg: PixelCNNSamplingConfig, ctx: RunContext) -> dict[str, Any]:
    dev = ctx.device
    if dev.type == "cuda":  # exactness is checked: no TF32; autotuned convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    model, meta = load_pixelcnnpp(cfg.checkpoint, dev)
    model = model.to(dtype[cfg.dtype])
    mcfg = model.config
    state_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (mcfg.channels, mcfg.height, mcfg.width)
    gumbel, logistic = pixelcnn_noise(cfg.batch, shape, mcfg.mixtures, gen, dev, state_dtype)
    graph = cfg.cuda_graph and dev.type == "cuda"
    problem = PixelCNNSampling(model, gumbel, logistic, cuda_graph=graph)
    specs = _specs(cfg, mcfg.width)
    ctx.log(
        f"PixelCNN++ {mcfg.channels}x{mcfg.height}x{mcfg.width}, {mcfg.filters} filters "
        f"({meta['data']['name']}, test {meta.get('test_bits_per_dim')} bits/dim), batch "
        f"{cfg.batch}, {cfg.dtype}, atol {cfg.atol}, CUDA graph {graph}, {cfg.repeats} repeats"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a method that fails is loud
        records, solved = compare(
            problem,
            specs,
            dev,
            reference=SEQ,
            baselines=(SEQ,),
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            atol=cfg.atol,
            log=ctx.log,
        )
    ref = solved[SEQ].value
    T = problem.length
    seq_time = next(r["wall_time_s"] for r in records if r["method"] == SEQ)
    frames = sorted(set(cfg.frames))
    n_img = min(cfg.grid_images, cfg.batch)
    grids: dict[str, Any] = {}
    for spec_, rec in zip(specs, records, strict=True):
        diff = (solved[spec_.label].value - ref).reshape(cfg.batch, T, -1)
        rec["pixels_differing"] = int((diff != 0).any(2).sum())
        if spec_.solver.name == SEQ or not cfg.trace:
            continue
        tr = trace_solve(spec_.solver, problem, ref, dev, frames, atol=cfg.atol)
        snaps = tr.pop("snapshots")
        rec["traces"].update(tr)
        per_iter = rec["wall_time_s"] / max(1, rec["num_iters"])
        grids[spec_.label] = {
            str(k): {
                "images": _uint8(problem, v, n_img),
                # the sequential loop's image at the same measured wall-clock
                "sequential_steps": min(T, round(k * per_iter / (seq_time / T))),
            }
            for k, v in sorted(snaps.items())
        }
        for g in grids[spec_.label].values():
            done = g["sequential_steps"]
            partial = ref.clone()
            partial[:, done:] = problem.initial()[:, done:]  # pixels not yet sampled: grey
            g["sequential_images"] = _uint8(problem, partial, n_img)
    return {
        "methods": records,
        "length": T,
        "image_shape": list(shape),
        "checkpoint": cfg.checkpoint,
        "model": {k: getattr(mcfg, k) for k in ("channels", "filters", "resnets", "mixtures")},
        "data": meta["data"],
        "test_bits_per_dim": meta.get("test_bits_per_dim"),
        "grids": grids,
        "final": {
            "sequential": _uint8(problem, ref, n_img),
            **{s.label: _uint8(problem, solved[s.label].value, n_img) for s in specs[1:]},
        },
    }


# --- figures and table, from the records only ----------------------------------------------


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    env = records.get("env", {})
    where = f"{env.get('device_name', '')}, torch {env.get('torch', '')}"
    title = (
        f"PixelCNN++ {'x'.join(map(str, records['image_shape']))}, "
        f"{records['model']['filters']} filters, {records['data']['name']} ({where})"
    )
    parallel = [r for r in records["methods"] if "l2_to_reference" in (r.get("traces") or {})]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(parallel):
        tr, color = r["traces"], f"C{i}"
        its = np.arange(1, len(tr["l2_to_reference"]) + 1)
        err = np.maximum(tr["l2_to_reference"], 1e-9)
        axes[0].semilogy(its, err, color=color, label=r["method"])
        axes[1].semilogy(np.asarray(tr["clock_s"]), err, color=color, label=r["method"])
        axes[2].plot(its, tr["positions_differing"], color=color, label=r["method"])
    for r in records["methods"]:
        if r["solver"] == SEQ:
            axes[1].axvline(r["wall_time_s"], color="gray", ls=":", lw=1)
            axes[1].text(r["wall_time_s"], 1, r["method"], rotation=90, fontsize=7, va="bottom")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall-clock (s; synchronised per iteration; dotted: sequential)")
    axes[2].set_xlabel("iteration")
    axes[0].set_ylabel("mean l2 error to the sequential sample ([-1, 1] scale)")
    axes[2].set_ylabel("(image, pixel) pairs differing from sequential")
    if parallel:
        for ax in axes:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "convergence.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for label, grid in records.get("grids", {}).items():
        keys = list(grid)
        n = len(grid[keys[0]]["images"])
        cols = int(np.ceil(np.sqrt(n)))
        fig, axes = plt.subplots(2, len(keys), figsize=(1.7 * len(keys), 3.8), squeeze=False)
        for j, k in enumerate(keys):
            g = grid[k]
            show_images(axes[0, j], g["sequential_images"], cols, f"seq. {g['sequential_steps']}")
            show_images(axes[1, j], g["images"], cols, f"{label.split('(')[0]} it. {k}")
        fig.suptitle(
            f"top: sequential at equal wall-clock (pixels done); bottom: {label}", fontsize=8
        )
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
        paths.append(out_dir / f"grid_{safe}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    final = records["final"]
    fig, axes = plt.subplots(1, len(final), figsize=(3.2 * len(final), 3.6), squeeze=False)
    for ax, (label, imgs) in zip(axes[0], final.items(), strict=True):
        show_images(ax, imgs, int(np.ceil(np.sqrt(len(imgs)))), f"{label} (same noise)")
    fig.tight_layout()
    paths.append(out_dir / "samples.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def summary(records: dict[str, Any]) -> str:
    return "\n".join(
        [
            format_table(records["methods"], [("pixels_differing", "pixels != seq.")]),
            "speed-up: vs sequential (same full forward per pixel, same CUDA graph); "
            "pixels != seq.: (image, pixel) pairs differing from the sequential sample",
        ]
    )


register_experiment(
    Experiment(
        name="pixelcnn-sampling",
        description="the paper's PixelCNN++ experiments: sequential vs Jacobi and hybrids",
        config=PixelCNNSamplingConfig,
        run=run,
        plot=plot,
        summary=summary,
    )
)
