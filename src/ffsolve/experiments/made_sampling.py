"""`ffsolve run made-sampling`: the paper's MADE experiment, measured for real.

Every method samples the same batch from the same noise; timed runs stop online and record
nothing; separate runs record the traces for the figures. Speed-ups are against both
sequential baselines: the naive loop (whole network per dimension, the paper's baseline)
and the incremental sampler (the strongest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.bench import MethodSpec, compare, format_table, synchronize
from ffsolve.config import Config, spec
from ffsolve.data import logit_bounds, logit_to_pixels
from ffsolve.errors import ConfigError
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.experiments.causal import DTYPE_NAMES, dtype_of
from ffsolve.models.made import load_made
from ffsolve.plots import mosaic, plt, save_figure
from ffsolve.problems.autoregressive import MADESampling, logistic_noise
from ffsolve.solvers import Solver

NAIVE, INCREMENTAL = "sequential-naive", "sequential-incremental"


PARALLEL = ("jacobi", "jacobi_gs", "gs_jacobi-block", "gs_jacobi-window")


@dataclass(frozen=True)
class MADESamplingConfig(Config):
    checkpoint: str = "checkpoints/made_mnist"
    batch: int = spec(100, ge=1)
    seed: int = spec(0, ge=0)
    dtype: str = spec("float32", choices=DTYPE_NAMES)
    block_size: int = spec(28, ge=1)  # jacobi_gs and gs_jacobi blocks (one MNIST row)
    window: int = spec(112, ge=1)  # gs_jacobi sliding window
    methods: tuple[str, ...] = spec(PARALLEL, choices=PARALLEL)
    # sequential baselines: "incremental" (the strongest) and "naive" (whole network per
    # dimension, the paper's baseline and the reference: it runs Jacobi's exact kernels)
    baselines: tuple[str, ...] = spec(("incremental", "naive"), choices=("incremental", "naive"))
    repeats: int = spec(5, ge=1)
    warmup: int = spec(1, ge=0)
    strip_every: int = spec(5, ge=1)  # sample strips at iterations 0, 5, ..., 45 and the final
    strip_frames: int = spec(10, ge=1)
    strip_images: int = spec(4, ge=1)
    grid_images: int = spec(64, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("methods", "baselines"):
            if not getattr(self, name):
                raise ConfigError(f"MADESamplingConfig.{name} must name at least one")


def _parallel_specs(cfg: MADESamplingConfig) -> list[MethodSpec]:
    table = {
        "jacobi": lambda: MethodSpec.of("jacobi", "jacobi"),
        "jacobi_gs": lambda: MethodSpec.of(
            f"jacobi_gs(block={cfg.block_size})", "jacobi_gs", block_size=cfg.block_size
        ),
        "gs_jacobi-block": lambda: MethodSpec.of(
            f"gs_jacobi(block={cfg.block_size})", "gs_jacobi", block_size=cfg.block_size
        ),
        "gs_jacobi-window": lambda: MethodSpec.of(
            f"gs_jacobi(window={cfg.window})", "gs_jacobi", window=cfg.window
        ),
    }
    unknown = [m for m in cfg.methods if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {', '.join(table)}")
    return [table[m]() for m in cfg.methods]


def _trace(
    solver: Solver,
    problem: MADESampling,
    final: torch.Tensor,
    reference: torch.Tensor,
    frames: list[int],
    device: torch.device,
) -> dict[str, Any]:
    """Per-iteration l2 error to the final sample, forward difference, clock and strips.

    The clock here synchronises after every iteration (so it is a little slower than the
    timed run, which does not).
    """
    prev = problem.initial().clone()
    errors, steps, clock, snaps = [], [], [], {}
    equal_final, equal_ref = [], []
    if 0 in frames:
        snaps[0] = prev.clone()

    def callback(k: int, x: torch.Tensor) -> None:
        synchronize(device)
        clock.append(time.perf_counter() - t0)
        errors.append((x - final).norm(dim=1).mean())
        steps.append((x - prev).norm(dim=1).mean())
        equal_final.append(torch.equal(x, final))
        equal_ref.append(torch.equal(x, reference))
        prev.copy_(x)
        if k in frames:
            snaps[k] = x.clone()

    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = solver.solve(problem, record=False, callback=callback)
    first = lambda flags: next((i + 1 for i, f in enumerate(flags) if f), None)  # noqa: E731
    return {
        "l2_to_final": [float(e) for e in errors],
        "forward_difference": [float(s) for s in steps],
        "clock_s": clock,
        "iters_to_exact_final": first(equal_final),
        "iters_to_equal_sequential": first(equal_ref),
        "num_iters": sol.num_iters,
        "snapshots": snaps,
    }


def _pixels(z: torch.Tensor, lam: float, shape: list[int], n: int) -> list:
    """Logit-space samples (B, D) -> uint8 images as nested lists (n, *shape)."""
    n = min(n, len(z))
    img = logit_to_pixels(z[:n].double(), lam) * 255
    return img.round().to(torch.uint8).reshape(n, *shape).cpu().tolist()


def run(cfg: MADESamplingConfig, ctx: RunContext) -> dict[str, Any]:
    if ctx.device.type == "cuda":  # exactness is checked: no TF32 matrix products
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = dtype_of(cfg.dtype)
    model, meta = load_made(cfg.checkpoint, ctx.device)
    model = model.to(dtype)
    lam = float(meta["data"]["lam"])
    shape = list(meta["data"]["shape"])
    D = model.dims
    g = torch.Generator().manual_seed(cfg.seed)
    noise = logistic_noise(cfg.batch, D, g, ctx.device, dtype)
    bounds = logit_bounds(lam)
    naive = MADESampling(model, noise, bounds)
    incremental = MADESampling(model, noise, bounds, incremental=True)
    rows = {"incremental": (INCREMENTAL, incremental), "naive": (NAIVE, naive)}
    if not cfg.baselines or set(cfg.baselines) - set(rows):
        raise ValueError(f"baselines must be a non-empty subset of {sorted(rows)}")
    baselines = [rows[b][0] for b in rows if b in cfg.baselines]
    reference = NAIVE if NAIVE in baselines else INCREMENTAL
    specs = [
        *(MethodSpec.of(rows[b][0], "sequential", rows[b][1]) for b in rows if b in cfg.baselines),
        *_parallel_specs(cfg),
    ]

    def pixels(z: torch.Tensor, n: int) -> list:  # sampling order -> images
        return _pixels(naive.to_dims(z), lam, shape, n)

    ctx.log(
        f"MADE {D} dims ({meta['data']['name']}, test {meta.get('test_bits_per_dim')} bits/dim),"
        f" batch {cfg.batch}, {cfg.dtype}, {cfg.repeats} timed repeats"
    )
    records, traced = compare(
        naive,
        specs,
        ctx.device,
        reference=reference,
        baselines=baselines,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        log=ctx.log,
    )
    final_ref = traced[reference].value
    for rec in records:
        for b in baselines:
            diff = traced[rec["method"]].value.double() - traced[b].value.double()
            rec[f"max_abs_diff_vs_{b}"] = float(diff.abs().max())
    frames = [cfg.strip_every * i for i in range(cfg.strip_frames)]
    strips: dict[str, Any] = {}
    for row, rec in zip(specs, records, strict=True):
        if row.solver.name == "sequential":
            continue
        tr = _trace(row.solver, naive, traced[row.label].value, final_ref, frames, ctx.device)
        snaps = tr.pop("snapshots")
        rec["traces"].update(tr)
        strips[row.label] = {str(k): pixels(v, cfg.strip_images) for k, v in sorted(snaps.items())}
        strips[row.label]["final"] = pixels(traced[row.label].value, cfg.strip_images)
    # Sequential frames at equal wall-clock: after as many steps as the sequential loop makes
    # in the time Jacobi takes for k iterations (measured medians of the timed runs).
    by = {r["method"]: r for r in records}
    seq_frames = {}
    if "jacobi" in by:
        seq = by[records[0]["strongest_baseline"]]
        per_iter = by["jacobi"]["wall_time_s"] / by["jacobi"]["num_iters"]
        per_step = seq["wall_time_s"] / D
        for k in frames:
            steps = min(D, round(k * per_iter / per_step))
            partial = final_ref.clone()
            partial[:, steps:] = 0  # positions not yet sampled hold the initial zeros
            seq_frames[str(k)] = {
                "steps": steps,
                "images": pixels(partial, cfg.strip_images),
            }
        seq_frames["baseline"] = seq["method"]
    n_grid = min(cfg.grid_images, cfg.batch)
    return {
        "methods": records,
        "reference": reference,
        "length": D,
        "image_shape": shape,
        "checkpoint": cfg.checkpoint,
        "data": meta["data"],
        "test_bits_per_dim": meta.get("test_bits_per_dim"),
        "strips": strips,
        "sequential_frames": seq_frames,
        "grid": {
            "sequential": pixels(final_ref, n_grid),
            "jacobi": pixels(traced[specs[len(baselines)].label].value, n_grid),
        },
    }


# --- figures, from the records only ------------------------------------------------------


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    env = records.get("env", {})
    where = f"{env.get('device_name', '')}, torch {env.get('torch', '')}"
    parallel = [r for r in records["methods"] if "l2_to_final" in (r.get("traces") or {})]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(parallel):
        tr, color = r["traces"], f"C{i}"
        its = np.arange(1, len(tr["l2_to_final"]) + 1)
        for ax, x in ((axes[0], its), (axes[1], np.asarray(tr["clock_s"]))):
            ax.semilogy(x, np.maximum(tr["l2_to_final"], 1e-12), color=color, label=r["method"])
            ax.semilogy(x, np.maximum(tr["forward_difference"], 1e-12), "--", color=color)
    for r in records["methods"]:
        if r["solver"] == "sequential":
            axes[1].axvline(r["wall_time_s"], color="gray", ls=":", lw=1)
            axes[1].text(r["wall_time_s"], 1, r["method"], rotation=90, fontsize=7, va="bottom")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall-clock (s, synchronised per iteration; dotted: sequential)")
    for ax in axes:
        ax.set_ylabel("mean l2 error to the final sample (logit space)")
    axes[0].legend(fontsize=8, title="solid: error, dashed: forward difference", title_fontsize=7)
    fig.suptitle(
        f"MADE sampling, {records['data']['name']}, D={records['length']} ({where})", fontsize=9
    )
    paths.append(save_figure(fig, out_dir / "convergence.png"))

    strips, seq = records.get("strips", {}), records.get("sequential_frames", {})
    jac = strips.get("jacobi")
    if jac:
        keys = [k for k in jac if k != "final"]
        cols = len(keys) + 1
        n_img = len(jac["final"])
        fig, axes = plt.subplots(
            2, cols, figsize=(1.3 * cols, 2.0 * max(1, n_img // 4) + 0.8), squeeze=False
        )
        for j, k in enumerate([*keys, "final"]):
            top = (
                seq.get(k, {}).get("images")
                if k != "final"
                else records["grid"]["sequential"][:n_img]
            )
            for row, imgs, label in (
                (0, top, f"seq. {seq[k]['steps']} steps" if k in seq else "sequential, final"),
                (1, jac[k], f"Jacobi it. {k}"),
            ):
                ax = axes[row, j]
                ax.axis("off")
                if imgs is not None:
                    arr, cmap = mosaic(imgs, 2)
                    ax.imshow(arr, cmap=cmap, vmin=0, vmax=255)
                ax.set_title(label, fontsize=6)
        fig.suptitle(
            f"top: sequential ({seq.get('baseline', '')}) at equal wall-clock; bottom: Jacobi",
            fontsize=8,
        )
        paths.append(save_figure(fig, out_dir / "strips.png", dpi=120))

    grid = records["grid"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, key in zip(axes, ("sequential", "jacobi"), strict=True):
        cols = int(np.ceil(np.sqrt(len(grid[key]))))
        arr, cmap = mosaic(grid[key], cols)
        ax.imshow(arr, cmap=cmap, vmin=0, vmax=255)
        ax.set_title(f"{key} (same noise)", fontsize=9)
        ax.axis("off")
    paths.append(save_figure(fig, out_dir / "samples.png"))
    return paths


def _equal_note(traces: dict[str, Any], reference: str) -> str:
    k = traces.get("iters_to_equal_sequential")
    if k is None:  # e.g. a windowed sweep: a different matrix product, float32 rounding
        return f"never bitwise equal to the {reference} sample"
    return f"bitwise equal to the {reference} sample from iteration {k}"


def summary(records: dict[str, Any]) -> str:
    first = records["methods"][0]
    short = {NAIVE: "naive", INCREMENTAL: "incr."}
    extra = [(f"speedup_vs_{b}", f"x vs {short[b]}") for b in short if f"speedup_vs_{b}" in first]
    other = [b for b in short if b != records["reference"] and f"max_abs_diff_vs_{b}" in first]
    extra += [(f"max_abs_diff_vs_{b}", f"|diff| vs {short[b]}") for b in other]
    lines = [
        format_table(records["methods"], extra),
        f"speed-up: vs the faster sequential baseline ({first['strongest_baseline']}); "
        f"max|diff|: vs {records['reference']}",
        "",
        "iterations until the iterate equals the final sample exactly:",
    ]
    for r in records["methods"]:
        tr = r.get("traces") or {}
        if "iters_to_exact_final" in tr:
            note = _equal_note(tr, records["reference"])
            lines.append(f"  {r['method']:<24} {tr['iters_to_exact_final']}  ({note})")
    return "\n".join(lines)


register_experiment(
    Experiment(
        name="made-sampling",
        description="the paper's MADE experiment: sequential vs Jacobi and hybrids, batch 100",
        config=MADESamplingConfig,
        run=run,
        plot=plot,
        summary=summary,
    )
)
