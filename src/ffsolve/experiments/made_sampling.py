"""`ffsolve run made-sampling`: the paper's MADE experiment, measured for real.

Every method samples the same batch from the same noise; timed runs stop online and record
nothing; separate runs record the traces for the figures. Speed-ups are against both
sequential baselines: the naive loop (whole network per dimension, the paper's baseline)
and the incremental sampler (the strongest). `capture` lists the capture modes each row
runs in ("auto": a CUDA graph on CUDA; "eager": never); `batches` adds a sweep of the batch
size (the strongest sequential baseline against Jacobi).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.bench import Row, format_table, solver_row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.data import logit_bounds, logit_to_pixels
from ffsolve.errors import ConfigError
from ffsolve.experiments import Case, Experiment, RunContext, Step, register_experiment
from ffsolve.models.made import load_made
from ffsolve.plots import mosaic, plt, save_figure
from ffsolve.problems import MADESampling, logistic_noise
from ffsolve.runtime import DTYPE_NAMES, dtype_of, exact_arithmetic
from ffsolve.solvers import Stopping, get_solver

NAIVE, INCREMENTAL = "sequential-naive", "sequential-incremental"


PARALLEL = ("jacobi", "jacobi_gs", "gs_jacobi-block", "gs_jacobi-window")
#: method="auto" among the rows' methods, on the incremental problem (its sequential
#: probe is then the strongest loop); not run by default (its probes are its price)
AUTO = "auto"


@dataclass(frozen=True)
class MADESamplingConfig(Config):
    """Attributes:
    methods: the parallel rows; auto adds method="auto" among the others listed, on the
        incremental problem (its sequential side is then the incremental loop).
    """

    checkpoint: str = "checkpoints/made_mnist"
    batch: int = spec(100, ge=1)
    seed: int = spec(0, ge=0)
    dtype: str = spec("float32", choices=DTYPE_NAMES)
    block_size: int = spec(28, ge=1)  # jacobi_gs and gs_jacobi blocks (one MNIST row)
    window: int = spec(112, ge=1)  # gs_jacobi sliding window
    methods: tuple[str, ...] = spec(PARALLEL, choices=(*PARALLEL, AUTO))
    # sequential baselines: "incremental" (the strongest) and "naive" (whole network per
    # dimension, the paper's baseline and the reference: it runs Jacobi's exact kernels)
    baselines: tuple[str, ...] = spec(("incremental", "naive"), choices=("incremental", "naive"))
    capture: tuple[str, ...] = spec(("auto",), choices=("auto", "eager"))
    batches: tuple[int, ...] = spec((), ge=1)  # a batch sweep: strongest baseline vs jacobi
    repeats: int = spec(5, ge=1)
    warmup: int = spec(1, ge=0)
    trace: bool = True  # traces, strips and sample grids (an extra untimed solve per method)
    strip_every: int = spec(5, ge=1)  # sample strips at iterations 0, 5, ..., 45 and the final
    strip_frames: int = spec(10, ge=1)
    strip_images: int = spec(4, ge=1)
    grid_images: int = spec(64, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("methods", "baselines", "capture"):
            if not getattr(self, name):
                raise ConfigError(f"MADESamplingConfig.{name} must name at least one")


def _rows(
    cfg: MADESamplingConfig, naive: MADESampling, incremental: MADESampling, methods=None
) -> list[Row]:
    """The sequential baselines, then the parallel methods, once per capture mode."""
    K, W = cfg.block_size, cfg.window
    table = {
        "jacobi": ("jacobi", "jacobi", {}),
        "jacobi_gs": (f"jacobi_gs(block={K})", "jacobi_gs", {"block_size": K}),
        "gs_jacobi-block": (f"gs_jacobi(block={K})", "gs_jacobi", {"block_size": K}),
        "gs_jacobi-window": (f"gs_jacobi(window={W})", "gs_jacobi", {"window": W}),
    }
    base = {"incremental": (INCREMENTAL, incremental), "naive": (NAIVE, naive)}
    rows = []
    for mode in cfg.capture:
        suffix = " (eager)" if mode == "eager" and len(cfg.capture) > 1 else ""
        stop = Stopping(capture="auto" if mode == "auto" else False)
        for b in ("incremental", "naive"):
            if b in cfg.baselines:
                label, problem = base[b]
                rows.append(solver_row(label + suffix, "sequential", problem, stop))
        chosen = cfg.methods if methods is None else methods
        for m in chosen:
            if m == AUTO:
                among = [get_solver(table[c][1], **table[c][2]) for c in chosen if c != AUTO]
                rows.append(
                    solver_row("auto" + suffix, "auto", incremental, stop, methods=among or None)
                )
                continue
            label, method, opts = table[m]
            rows.append(solver_row(label + suffix, method, naive, stop, **opts))
    return rows


def _pixels(z: torch.Tensor, lam: float, shape: list[int], n: int) -> list:
    """Logit-space samples (B, D) -> uint8 images as nested lists (n, *shape)."""
    n = min(n, len(z))
    img = logit_to_pixels(z[:n].double(), lam) * 255
    return img.round().to(torch.uint8).reshape(n, *shape).cpu().tolist()


def _check_sizes(cfg: MADESamplingConfig, D: int) -> None:
    """Size relations known once the model is loaded, checked before any row runs."""
    for name in ("block_size", "window"):
        if getattr(cfg, name) > D:
            raise ConfigError(
                f"MADESamplingConfig.{name}={getattr(cfg, name)} is larger than the model's "
                f"{D} dimensions"
            )


def run(cfg: MADESamplingConfig, ctx: RunContext) -> dict[str, Any]:
    exact_arithmetic(ctx.device)  # exactness is checked: no TF32 matrix products
    dtype = dtype_of(cfg.dtype)
    model, meta = load_made(cfg.checkpoint, ctx.device, require=("data.lam", "data.shape"))
    model = model.to(dtype)
    lam = float(meta["data"]["lam"])
    shape = list(meta["data"]["shape"])
    D = model.dims
    _check_sizes(cfg, D)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = logistic_noise(cfg.batch, D, g, ctx.device, dtype)
    bounds = logit_bounds(lam)
    naive = MADESampling(model, noise, bounds)
    incremental = MADESampling(model, noise, bounds, incremental=True)
    rows = _rows(cfg, naive, incremental)
    baselines = [r.label for r in rows if r.kind == "sequential"]
    reference = next((b for b in baselines if b.startswith(NAIVE)), baselines[0])

    def pixels(z: torch.Tensor, n: int) -> list:  # sampling order -> images
        return _pixels(naive.to_dims(z), lam, shape, n)

    ctx.log(
        f"MADE {D} dims ({meta['data'].get('name', '?')}, test {_bpd(meta)} bits/dim),"
        f" batch {cfg.batch}, {cfg.dtype}, {cfg.repeats} timed repeats"
    )
    records, outcomes = timed_rows(
        rows, ctx.device, warmup=cfg.warmup, repeats=cfg.repeats, reference=reference,
        log=ctx.log, keep=ctx.keep,
    )  # fmt: skip
    final_ref = outcomes[reference].value
    for rec in records:
        if "error" in rec:
            continue
        for b in baselines:
            diff = outcomes[rec["method"]].value.double() - outcomes[b].value.double()
            rec[f"max_abs_diff_vs_{b}"] = float(diff.abs().max())
    out: dict[str, Any] = {
        "methods": records,
        "reference": reference,
        "length": D,
        "image_shape": shape,
        "checkpoint": cfg.checkpoint,
        "data": meta["data"],
        "test_bits_per_dim": meta.get("test_bits_per_dim"),
    }
    if cfg.trace:
        out.update(_traces(cfg, rows, records, outcomes, final_ref, D, pixels, ctx))
    if cfg.batches:
        out["batch_sweep"] = _batch_sweep(cfg, model, bounds, dtype, ctx)
    return out


def _bpd(meta: dict[str, Any]) -> str:
    v = meta.get("test_bits_per_dim")
    return "?" if v is None else f"{v:.3f}"


def _traces(cfg, rows, records, outcomes, final_ref, D, pixels, ctx) -> dict[str, Any]:
    """Per-iteration traces, sample strips, the sequential loop at equal wall-clock and the
    sample grids (untimed solves)."""
    frames = [cfg.strip_every * i for i in range(cfg.strip_frames)]
    strips: dict[str, Any] = {}
    for row, rec in zip(rows, records, strict=True):
        if row.kind == "sequential" or "error" in rec:
            continue
        own = outcomes[row.label].value
        tr = row.trace(final_ref, ctx.device, frames=frames, final=own)
        snaps = tr.pop("snapshots")
        tr["iters_to_equal_sequential"] = tr["iters_to_equal_reference"]
        rec["traces"] = tr
        strips[row.label] = {str(k): pixels(v, cfg.strip_images) for k, v in sorted(snaps.items())}
        strips[row.label]["final"] = pixels(own, cfg.strip_images)
    # Sequential frames at equal wall-clock: after as many steps as the sequential loop makes
    # in the time Jacobi takes for k iterations (measured medians of the timed runs).
    by = {r["method"]: r for r in records if "error" not in r}
    seq_frames: dict[str, Any] = {}
    if "jacobi" in by and "strongest_baseline" in by["jacobi"]:
        seq = by[by["jacobi"]["strongest_baseline"]]
        per_iter = by["jacobi"]["wall_time_s"] / by["jacobi"]["num_iters"]
        per_step = seq["wall_time_s"] / D
        for k in frames:
            steps = min(D, round(k * per_iter / per_step))
            partial = final_ref.clone()
            partial[:, steps:] = 0  # positions not yet sampled hold the initial zeros
            seq_frames[str(k)] = {"steps": steps, "images": pixels(partial, cfg.strip_images)}
        seq_frames["baseline"] = seq["method"]
    n_grid = min(cfg.grid_images, cfg.batch)
    first = next(r for r in rows if r.kind != "sequential")
    grid = {"sequential": pixels(final_ref, n_grid)}
    if first.label in outcomes:
        grid["jacobi"] = pixels(outcomes[first.label].value, n_grid)
    return {"strips": strips, "sequential_frames": seq_frames, "grid": grid}


def _batch_sweep(cfg, model, bounds, dtype, ctx) -> list[dict[str, Any]]:
    """Per batch size (same seed, each its own noise draw): the sequential baselines and
    Jacobi, in the first capture mode."""
    out = []
    one = MADESamplingConfig(
        checkpoint=cfg.checkpoint, capture=cfg.capture[-1:], baselines=cfg.baselines
    )
    for B in cfg.batches:
        ctx.log(f" batch {B}")
        g = torch.Generator().manual_seed(cfg.seed)
        noise = logistic_noise(B, model.dims, g, ctx.device, dtype)
        naive = MADESampling(model, noise, bounds)
        inc = MADESampling(model, noise, bounds, incremental=True)
        rows = _rows(one, naive, inc, methods=("jacobi",))
        recs, _ = timed_rows(
            rows, ctx.device, warmup=cfg.warmup, repeats=cfg.repeats, log=ctx.log, keep=ctx.keep
        )
        out.append({"batch": B, "rows": recs})
    return out


# --- figures, from the records only ------------------------------------------------------


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    env = records.get("env", {})
    where = f"{env.get('device_name', '')}, torch {env.get('torch', '')}"
    parallel = [r for r in records["methods"] if "l2_to_final" in (r.get("traces") or {})]
    if not parallel:  # a run without traces (trace=false): no figures
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(parallel):
        tr, color = r["traces"], f"C{i}"
        its = np.arange(1, len(tr["l2_to_final"]) + 1)
        for ax, x in ((axes[0], its), (axes[1], np.asarray(tr["clock_s"]))):
            ax.semilogy(x, np.maximum(tr["l2_to_final"], 1e-12), color=color, label=r["method"])
            ax.semilogy(x, np.maximum(tr["forward_difference"], 1e-12), "--", color=color)
    for r in records["methods"]:
        if r["solver"] == "sequential" and "wall_time_s" in r:
            axes[1].axvline(r["wall_time_s"], color="gray", ls=":", lw=1)
            axes[1].text(r["wall_time_s"], 1, r["method"], rotation=90, fontsize=7, va="bottom")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall-clock (s, synchronised per iteration; dotted: sequential)")
    for ax in axes:
        ax.set_ylabel("mean l2 error to the final sample (logit space)")
    axes[0].legend(fontsize=8, title="solid: error, dashed: forward difference", title_fontsize=7)
    fig.suptitle(
        f"MADE sampling, {records['data'].get('name', '')}, D={records['length']} ({where})",
        fontsize=9,
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

    grid = records.get("grid") or {}
    if len(grid) < 2:
        return paths
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
    ok = [r for r in records["methods"] if "error" not in r]
    first = ok[0] if ok else {}
    short = {NAIVE: "naive", INCREMENTAL: "incr."}
    extra = [(f"speedup_vs_{b}", f"x vs {short[b]}") for b in short if f"speedup_vs_{b}" in first]
    other = [b for b in short if b != records["reference"] and f"max_abs_diff_vs_{b}" in first]
    extra += [(f"max_abs_diff_vs_{b}", f"|diff| vs {short[b]}") for b in other]
    lines = [
        format_table(records["methods"], extra),
        f"speed-up: vs the faster sequential baseline ({first.get('strongest_baseline')}); "
        f"max|diff|: vs {records['reference']}",
    ]
    traced = [r for r in ok if "iters_to_exact_final" in (r.get("traces") or {})]
    if traced:
        lines += ["", "iterations until the iterate equals the final sample exactly:"]
    for r in traced:
        tr = r["traces"]
        note = _equal_note(tr, records["reference"])
        lines.append(f"  {r['method']:<24} {tr['iters_to_exact_final']}  ({note})")
    for entry in records.get("batch_sweep") or []:
        lines += ["", f"batch {entry['batch']}:", format_table(entry["rows"])]
    return "\n".join(lines)


#: the paper's numbers (Song et al. 2021, from the original notebooks)
PAPER = {
    "made-mnist": {"sequential_s": 0.343, "iters": 31, "jacobi_s": 0.0126, "speedup": 27.2},
    "made-rgb": {"sequential_s": 3.03, "iters": 92, "jacobi_s": 0.119, "speedup": 25.3},
}


def paper(records: dict[str, Any], key: str) -> list[str]:
    """The report's rows beside the paper's numbers (its speed-ups are against its naive
    loop; ours against the strongest sequential baseline measured in the same process)."""
    by = {m["method"]: m for m in records["methods"] if "error" not in m}
    jac = by.get("jacobi")
    naive = by.get(NAIVE)
    if jac is None or "strongest_baseline" not in jac:
        return [f"| {key} | no timed jacobi row | | |"]
    strongest = by[jac["strongest_baseline"]]
    p = PAPER[key]
    ours_seq = f"{strongest['wall_time_s']:.3g} s ({strongest['method']})"
    if naive is not None and naive is not strongest:
        ours_seq += f"; naive {naive['wall_time_s']:.3g} s"
    vs_naive = f", {naive['wall_time_s'] / jac['wall_time_s']:.1f}x vs naive" if naive else ""
    return [
        f"| {key} | sequential | {p['sequential_s']:.3g} s | {ours_seq} |",
        f"| {key} | Jacobi iterations | {p['iters']} | {jac['num_iters']} |",
        f"| {key} | Jacobi time | {p['jacobi_s']:.3g} s | {jac['wall_time_s']:.3g} s |",
        f"| {key} | speed-up | {p['speedup']}x (vs the naive loop) | "
        f"{jac['speedup_vs_sequential']:.1f}x vs the strongest{vs_naive} |",
    ]


_RGB = ("checkpoint=checkpoints/made_rgb", "block_size=96", "window=384")
_FAST = ("capture=[eager, auto]", "trace=false", "repeats=7", "warmup=2")

register_experiment(
    Experiment(
        name="made-sampling",
        description="the paper's MADE experiment: sequential vs Jacobi and hybrids, batch 100",
        config=MADESamplingConfig,
        run=run,
        plot=plot,
        summary=summary,
        paper=paper,
        steps=(
            Step(
                "made-mnist",
                ("checkpoint=checkpoints/made_mnist", "batch=100"),
                checkpoint="checkpoints/made_mnist",
            ),
            Step("made-rgb", ("batch=100", *_RGB), checkpoint="checkpoints/made_rgb"),
        ),  # fmt: skip
        bench=(
            Case("made-mnist", (*_FAST, "methods=[jacobi, jacobi_gs, gs_jacobi-window]")),
            Case("made-rgb", (*_FAST, *_RGB, "methods=[jacobi, jacobi_gs, gs_jacobi-window]")),
            Case(
                "made-batch",
                (
                    "trace=false",
                    "repeats=7",
                    "warmup=2",
                    "methods=[jacobi]",
                    "batches=[1, 4, 16, 64, 256, 1024]",
                ),
            ),
        ),  # fmt: skip
    )
)
