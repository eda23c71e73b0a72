"""`ffsolve run pixelcnn-sampling`: the paper's PixelCNN++ experiments, measured for real.

One noise draw for every method; every method stops online and is timed (median of repeats,
device synchronised) side by side with the sequential loop in the same process; every result
is compared with the sequential sample (pixels differing). The sequential loop runs the very
same full forward as a Jacobi sweep, so the two agree bitwise (see `problems.pixelcnn`).

With `cached` (the default) a second baseline, `sequential-cached` (Fast PixelCNN++
generation: each layer recomputed on one row per level), is timed too, and the hybrids use
the problem's cheap paths: jacobi_gs sweeps rows with cached single-pixel steps, gs_jacobi's
window runs a forward cropped to the rows it needs. `batches` adds a sweep of the batch size:
the fastest parallel method of the main table against the cached sequential loop.

Weight normalisation is folded into plain weights once, cudnn.benchmark is on, and on CUDA
(`capture`) the forward (plus the sampling arithmetic) is captured in a CUDA graph that both
the sequential loop and the parallel sweeps replay.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.bench import Row, format_table, solver_row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.errors import ConfigError
from ffsolve.experiments import Case, Experiment, RunContext, Step, register_experiment
from ffsolve.models.pixelcnnpp import load_pixelcnnpp
from ffsolve.plots import plt, save_figure, show_images
from ffsolve.problems import PixelCNNSampling, pixelcnn_noise
from ffsolve.runtime import exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, Stopping, get_solver

SEQ = "sequential"
SEQC = "sequential-cached"


@dataclass(frozen=True)
class PixelCNNSamplingConfig(Config):
    """The paper's settings: MNIST batch 16, 32x32 RGB batch 4.

    Attributes:
        checkpoint: a PixelCNN++ checkpoint (`ffsolve train pixelcnnpp`).
        batch, seed: the noise draw shared by every method.
        dtype: the network's dtype (bfloat16: a cheaper forward on both sides; the state and
            the sampling arithmetic stay float32).
        methods: parallel methods: jacobi, jacobi_gs (blocks = image rows), gs_jacobi (a
            sliding window of `window_rows` rows); auto (method="auto" among the others
            listed, on the cached problem: its sequential side is the cached loop).
        atol, rtol: stopping tolerance on the [-1, 1] scale (isclose); 0 is exact equality,
            atol 0.02 a change of at most 0.01 on the [0, 1] scale; the paper's code used
            atol 1e-5 and rtol 1e-3.
        capture: capture the forward in a CUDA graph on CUDA (both sides of every ratio).
        cached: time the cached sequential sampler too (`sequential-cached`) and run the
            hybrids on the problem's cheap paths (cached row sweeps, cropped windows).
        capture_cached_loop: with `capture`, capture the whole cached sequential loop in one
            CUDA graph (else it runs eagerly, one launch per kernel).
        batches: batch sizes of a sweep (the fastest parallel method of the main table
            against sequential-cached; empty: no sweep).
        repeats, warmup: timed runs (median) after untimed ones.
        frames: iterations shown in the sample grids (with the sequential loop's image at
            equal wall-clock); trace: record per-iteration errors (an extra, untimed solve).
    """

    checkpoint: str = "checkpoints/pixelcnnpp_mnist"
    batch: int = spec(16, ge=1)
    seed: int = spec(0, ge=0)
    dtype: str = spec("float32", choices=("float32", "bfloat16", "float64"))
    methods: tuple[str, ...] = spec(
        ("jacobi",), choices=("jacobi", "jacobi_gs", "gs_jacobi", "auto")
    )
    window_rows: int = spec(15, ge=1)
    atol: float = spec(0.0, ge=0.0)
    rtol: float = spec(0.0, ge=0.0)
    capture: bool = True
    cached: bool = True
    capture_cached_loop: bool = True
    batches: tuple[int, ...] = spec((), ge=1, le=64)
    cudnn_benchmark: bool = True
    repeats: int = spec(3, ge=1)
    warmup: int = spec(1, ge=0)
    trace: bool = True
    frames: tuple[int, ...] = spec((0, 10, 20, 40, 80, 160), ge=0)
    grid_images: int = spec(16, ge=1)


def _rows(
    cfg: PixelCNNSamplingConfig,
    W: int,
    plain: PixelCNNSampling | None,
    cached: PixelCNNSampling | None,
    methods: tuple[str, ...],
) -> list[Row]:
    """The rows: sequential (plain), sequential-cached and the parallel methods; the hybrids
    run on the cached problem when there is one."""
    fast = cached or plain  # the hybrids' problem
    stop = Stopping(atol=cfg.atol, rtol=cfg.rtol)
    table = {
        "jacobi": lambda: solver_row("jacobi", "jacobi", plain or fast, stop),
        "jacobi_gs": lambda: solver_row(
            f"jacobi_gs(row={W})", "jacobi_gs", fast, stop, block_size=W
        ),
        "gs_jacobi": lambda: solver_row(
            f"gs_jacobi(window={cfg.window_rows} rows)",
            "gs_jacobi",
            fast,
            stop,
            window=cfg.window_rows * W,
        ),  # fmt: skip
    }
    rows = []
    if plain is not None:
        rows.append(solver_row(SEQ, "sequential", plain))
    if cached is not None:
        capture = "auto" if cached.capturable_stepper else False
        rows.append(solver_row(SEQC, "sequential", cached, Stopping(capture=capture)))
    chosen = [table[m]() for m in methods if m != "auto"]
    if "auto" in methods:  # among the rows' methods, on the problem with the cheap loop
        among = [r.solver for r in chosen]
        rows.append(solver_row("auto", "auto", fast, stop, methods=among or None))
    return [*rows, *chosen]


def _probe_capture(cached: PixelCNNSampling, log) -> None:
    """Capture the cached sequential loop once (also its warm-up); if the capture fails, say
    why and fall back to the eager cached loop instead of losing the row."""
    if not cached.capturable_stepper:
        return
    try:
        with torch.no_grad():
            get_solver("sequential").solve(cached, record=False, capture=True)
    except Exception as e:  # noqa: BLE001  (any capture failure: keep the eager loop)
        log(f"  capturing the cached sequential loop failed ({type(e).__name__}: {e}); eager")
        cached.capturable_stepper = False
        cached.graphs.invalidate()


def _uint8(problem: PixelCNNSampling, x: torch.Tensor, n: int) -> list:
    """States (B, H*W, C) -> the first n images as uint8 nested lists (n, H, W[, 3])."""
    img = problem.to_images(x[:n]).double()  # (n, C, H, W) in [-1, 1]
    img = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return (img[..., 0] if img.shape[-1] == 1 else img).cpu().tolist()


def _bpd(meta: dict[str, Any]) -> str:
    v = meta.get("test_bits_per_dim")
    return "?" if v is None else f"{v:.3f}"


def _cached(cfg, model, gumbel, logistic, graph, log) -> PixelCNNSampling:
    cached = PixelCNNSampling(model, gumbel, logistic, capture=graph, cached=True)
    cached.capturable_stepper = cached.capturable_stepper and cfg.capture_cached_loop
    _probe_capture(cached, log)
    return cached


def run(cfg: PixelCNNSamplingConfig, ctx: RunContext) -> dict[str, Any]:
    dev = ctx.device
    exact_arithmetic(dev, cfg.cudnn_benchmark)  # equality is checked: no TF32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    model, meta = load_pixelcnnpp(cfg.checkpoint, dev, require=("data.name",))
    model = model.to(dtype[cfg.dtype])
    mcfg = model.config
    if cfg.window_rows > mcfg.height and "gs_jacobi" in cfg.methods:
        raise ConfigError(
            f"window_rows must be at most the image height {mcfg.height}, got {cfg.window_rows}"
        )
    state_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (mcfg.channels, mcfg.height, mcfg.width)
    gumbel, logistic = pixelcnn_noise(cfg.batch, shape, mcfg.mixtures, gen, dev, state_dtype)
    graph = cfg.capture and dev.type == "cuda"
    problem = PixelCNNSampling(model, gumbel, logistic, capture=graph)
    cached = _cached(cfg, model, gumbel, logistic, graph, ctx.log) if cfg.cached else None
    rows = _rows(cfg, mcfg.width, problem, cached, cfg.methods)
    ctx.log(
        f"PixelCNN++ {mcfg.channels}x{mcfg.height}x{mcfg.width}, {mcfg.filters} filters "
        f"({meta['data']['name']}, test {_bpd(meta)} bits/dim), batch "
        f"{cfg.batch}, {cfg.dtype}, atol {cfg.atol}, rtol {cfg.rtol}, CUDA graph {graph}, "
        f"{cfg.repeats} repeats"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a method that fails is loud
        records, solved = timed_rows(
            rows,
            dev,
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            reference=SEQ,
            log=ctx.log,
            keep=ctx.keep,
        )
    failed = [r["method"] for r in records if "error" in r]
    if SEQ in failed:
        raise RuntimeError(f"the sequential reference failed: {records[0]['error']}")
    ref = solved[SEQ].value
    T = problem.length
    # the grids show the strongest sequential loop at equal wall-clock
    seq_time = min(r["wall_time_s"] for r in records if r["solver"] == SEQ and "error" not in r)
    frames = sorted(set(cfg.frames))
    n_img = min(cfg.grid_images, cfg.batch)
    grids: dict[str, Any] = {}
    for row, rec in zip(rows, records, strict=True):
        if "error" in rec:
            continue
        diff = (solved[row.label].value - ref).reshape(cfg.batch, T, -1)
        rec["pixels_differing"] = int((diff != 0).any(2).sum())
        # beyond rounding: a flipped mixture component (or a visible change of value)
        rec["pixels_differing_1e-3"] = int((diff.abs() > 1e-3).any(2).sum())
        if row.kind == SEQ or not cfg.trace:
            continue
        tr = row.trace(ref, dev, frames=frames)
        snaps = tr.pop("snapshots")
        rec["traces"] = tr
        per_iter = rec["wall_time_s"] / max(1, rec["num_iters"])
        grids[row.label] = {
            str(k): {
                "images": _uint8(problem, v, n_img),
                # the sequential loop's image at the same measured wall-clock
                "sequential_steps": min(T, round(k * per_iter / (seq_time / T))),
            }
            for k, v in sorted(snaps.items())
        }
        for g in grids[row.label].values():
            done = g["sequential_steps"]
            partial = ref.clone()
            partial[:, done:] = problem.initial()[:, done:]  # pixels not yet sampled: grey
            g["sequential_images"] = _uint8(problem, partial, n_img)
    sweep = []
    parallel = [r for r in records if r["solver"] != SEQ and "error" not in r]
    if cfg.batches and parallel:
        best = max(parallel, key=lambda r: r["speedup_vs_sequential"])
        name = best["solver"]
        sweep = _batch_sweep(cfg, model, state_dtype, graph, name, dev, ctx)
    return {
        "methods": records,
        "batch_sweep": sweep,
        "length": T,
        "image_shape": list(shape),
        "checkpoint": cfg.checkpoint,
        "model": {k: getattr(mcfg, k) for k in ("channels", "filters", "resnets", "mixtures")},
        "data": meta["data"],
        "test_bits_per_dim": meta.get("test_bits_per_dim"),
        "grids": grids,
        "final": {
            "sequential": _uint8(problem, ref, n_img),
            **{
                r.label: _uint8(problem, solved[r.label].value, n_img)
                for r in rows[1:]
                if r.label in solved
            },
        },  # fmt: skip
    }


def _batch_sweep(cfg, model, state_dtype, graph, method, dev, ctx) -> list[dict[str, Any]]:
    """The parallel `method` against sequential-cached at every batch size of cfg.batches
    (same seed; each size its own noise draw)."""
    mcfg = model.config
    shape = (mcfg.channels, mcfg.height, mcfg.width)
    out = []
    for b in cfg.batches:
        gen = torch.Generator().manual_seed(cfg.seed)
        g, e = pixelcnn_noise(b, shape, mcfg.mixtures, gen, dev, state_dtype)
        cached = _cached(cfg, model, g, e, graph, ctx.log)
        rows = _rows(cfg, mcfg.width, None, cached, (method,))
        ctx.log(f"batch {b}:")
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            recs, _ = timed_rows(
                rows,
                dev,
                warmup=cfg.warmup,
                repeats=cfg.repeats,
                reference=SEQC,
                log=ctx.log,
                keep=ctx.keep,
            )
        if any("error" in r for r in recs):
            out.append({"batch": b, "error": "; ".join(r.get("error", "") for r in recs)})
            continue
        par = recs[1]
        out.append(
            {
                "batch": b,
                "method": par["method"],
                "num_iters": par["num_iters"],
                "parallel_s": par["wall_time_s"],
                "sequential_cached_s": recs[0]["wall_time_s"],
                "speedup_vs_sequential_cached": par["speedup_vs_sequential-cached"],
                "max_abs_diff": par["max_abs_diff_vs_sequential"],
            }
        )
    return out


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
        if r["solver"] == SEQ and "wall_time_s" in r:
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
    paths.append(save_figure(fig, out_dir / "convergence.png"))

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
        safe = "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")
        paths.append(save_figure(fig, out_dir / f"grid_{safe}.png", dpi=120))

    final = records["final"]
    fig, axes = plt.subplots(1, len(final), figsize=(3.2 * len(final), 3.6), squeeze=False)
    for ax, (label, imgs) in zip(axes[0], final.items(), strict=True):
        show_images(ax, imgs, int(np.ceil(np.sqrt(len(imgs)))), f"{label} (same noise)")
    paths.append(save_figure(fig, out_dir / "samples.png"))
    return paths


def summary(records: dict[str, Any]) -> str:
    extra = [("pixels_differing", "pixels != seq."), ("pixels_differing_1e-3", "> 1e-3")]
    if any("speedup_vs_sequential-cached" in r for r in records["methods"]):
        extra.insert(0, ("speedup_vs_sequential-cached", "vs cached"))
    lines = [
        format_table(records["methods"], extra),
        "speed-up: vs sequential (same full forward per pixel, same CUDA graph); vs cached: "
        "vs the cached sequential sampler; pixels != seq.: (image, pixel) pairs differing "
        "from the sequential sample (> 1e-3: by more than rounding)",
    ]
    sweep = [r for r in records.get("batch_sweep") or [] if "error" not in r]
    for r in records.get("batch_sweep") or []:
        if "error" in r:
            lines.append(f"batch {r['batch']}: FAILED: {r['error']}")
    if sweep:
        lines += ["", f"batch sweep ({sweep[0]['method']} vs sequential-cached):"]
        lines.append("batch  iters  parallel s  cached s  speed-up")
        for r in sweep:
            lines.append(
                f"{r['batch']:<5}  {r['num_iters']:<5}  {r['parallel_s']:<10.4f}  "
                f"{r['sequential_cached_s']:<8.4f}  {r['speedup_vs_sequential_cached']:.2f}x"
            )
    return "\n".join(lines)


#: the paper's numbers (Song et al. 2021, from the original notebooks): seconds per batch
PAPER: dict[str, dict[str, Any]] = {
    "pixelcnn-mnist": {
        "seconds": {"sequential": 12.15, "sequential-cached": 8.23, "jacobi": 1.94,
                    "gs_jacobi": 1.86, "jacobi_gs": 5.95},
        "best_vs_cached": 4.4,
    },
    "pixelcnn-rgb": {
        "seconds": {"sequential": 30.95, "sequential-cached": 17.76, "jacobi": 26.16,
                    "jacobi_gs": 14.76, "gs_jacobi": 14.87},
        "best_vs_cached": 1.2,
    },
}  # fmt: skip


def paper(records: dict[str, Any], key: str) -> list[str]:
    """Each row's time beside the paper's, and the best parallel method against the cached
    sequential sampler."""
    p = PAPER[key]
    rows, cached, best = [], None, None
    for m in records["methods"]:
        if "error" in m:
            rows.append(f"| {key} | {m['method']} | | failed: {m['error'][:80]} |")
            continue
        label = m["method"]
        ref = p["seconds"].get(label, p["seconds"].get(m["solver"]))
        if label == SEQC:
            cached = m
        elif m["solver"] != SEQ and (best is None or m["wall_time_s"] < best["wall_time_s"]):
            best = m
        extra = f", {m['num_iters']} iterations" if m["solver"] != SEQ else ""
        rows.append(
            f"| {key} | {label} | {'' if ref is None else f'{ref:.3g} s'} | "
            f"{m['wall_time_s']:.3g} s{extra} |"
        )
    if cached is not None and best is not None:
        rows.append(
            f"| {key} | best parallel vs cached sequential | {p['best_vs_cached']}x | "
            f"{cached['wall_time_s'] / best['wall_time_s']:.2f}x ({best['method']}) |"
        )
    return rows


register_experiment(
    Experiment(
        name="pixelcnn-sampling",
        description="the paper's PixelCNN++ experiments: sequential vs Jacobi and hybrids",
        config=PixelCNNSamplingConfig,
        run=run,
        plot=plot,
        summary=summary,
        paper=paper,
        steps=(
            Step(
                "pixelcnn-mnist",
                config="configs/pixelcnn_sampling_mnist.yaml",
                checkpoint="checkpoints/pixelcnnpp_mnist",
            ),
            Step(
                "pixelcnn-rgb",
                config="configs/pixelcnn_sampling_rgb.yaml",
                checkpoint="checkpoints/pixelcnnpp_rgb",
            ),
        ),  # fmt: skip
        bench=(
            Case(
                "pixelcnn-mnist",
                ("methods=[jacobi, jacobi_gs, gs_jacobi]", "trace=false"),
                default=False,
            ),
        ),  # fmt: skip
    )
)
