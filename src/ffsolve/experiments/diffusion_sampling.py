"""`ffsolve run diffusion-sampling`: a trained DDPM sampled by every method, side by side.

For each schedule (DDPM with its 1000 steps, DDIM with 100 or 25, any eta) and batch size,
one draw of all the noise (x_T and one draw per step) is shared by every row:

- `sequential`: ffsolve's sequential loop (on CUDA captured in one CUDA graph: the strongest
  baseline), the reference of every max|diff|;
- `diffusers loop`: what a user runs, `scheduler.step` after `unet(x, t)` per step (DDIM gets
  the same noise through `variance_noise`; DDPM's step draws its own, so only its time counts);
- `paradigms (peer)`: ParaDiGMS's sliding-window Picard loop as the paper describes it, written
  here around diffusers' `DDPMParallelScheduler` / `DDIMParallelScheduler` (eta 0 only, as
  published), with the same window and tolerance;
- `jacobi` (the paper's method on the step form: about one step per sweep), `picard` (ParaDiGMS
  in ffsolve's loop) and `anderson` (ParaTAA's triangular Anderson acceleration of Picard's map),
  each exact (tolerance 0) and at every tolerance of `tolerances` under ParaDiGMS's rule
  (mean squared change of a step at most tol^2 times its noise variance).

Rows compare final samples (the last step). With `fid_samples`, the DenseNet-BC FID (features
of the shipped Fashion-MNIST classifier, NOT Inception's) of the sequential samples (two seeds:
their spread) and of picard and anderson at each tolerance, against the data's test images.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffsolve.bench import Outcome, Row, format_table, timed_rows
from ffsolve.config import Config, spec
from ffsolve.errors import ConfigError
from ffsolve.experiments import Case, Experiment, RunContext, register_experiment
from ffsolve.plots import plt, save_figure, show_images
from ffsolve.problems import DiffusionSampling, diffusion_noise
from ffsolve.runtime import exact_arithmetic, synchronize
from ffsolve.solvers import ConvergenceWarning, Stopping, get_solver

SCHEDULES = ("ddpm-1000", "ddim-100", "ddim-25", "ddpm-100", "ddim-10")
METHODS = ("jacobi", "picard", "anderson")
AUTO = "auto"  # method="auto" among the methods configured beside it (not run by default)


@dataclass(frozen=True)
class DiffusionSamplingConfig(Config):
    """Attributes:
    checkpoint: a DDPM checkpoint (`ffsolve train ddpm`).
    schedules: "ddpm-STEPS" or "ddim-STEPS" (steps of the sampler).
    eta: DDIM's eta (0: deterministic; the peer row needs 0).
    batches: images per sample call.
    methods: parallel methods (each exact and at every tolerance); auto: method="auto"
        among the others listed, per tolerance.
    tolerances: tolerances of ParaDiGMS's rule (0: exact, bitwise certificate).
    windows: steps per sweep of picard, anderson and the peer (ParaDiGMS's `parallel`),
        one row each (a window as long as the schedule is the static whole).
    exact_windows: the windows also timed at tolerance 0 (every sweep is needed there;
        empty: all of `windows`).
    history: anderson's history.
    jacobi_max_steps: jacobi only on schedules this short (it needs ~one sweep per step).
    capture: CUDA graphs on CUDA (the sequential loop; jacobi's chunks).
    fid_samples: images per FID (0: none); fid_batch: images per sampling call;
        fid_window: the window of picard and anderson there (0: the first of `windows`).
    """

    checkpoint: str = "checkpoints/ddpm_mnist"
    schedules: tuple[str, ...] = spec(("ddpm-1000", "ddim-100", "ddim-25"), choices=SCHEDULES)
    eta: float = spec(0.0, ge=0.0)
    batches: tuple[int, ...] = spec((1, 4, 16), ge=1)
    methods: tuple[str, ...] = spec(METHODS, choices=(*METHODS, AUTO))
    tolerances: tuple[float, ...] = spec((0.0, 0.1), ge=0.0)
    windows: tuple[int, ...] = spec((8, 16, 32, 64), ge=1)
    exact_windows: tuple[int, ...] = spec((), ge=1)
    history: int = spec(3, ge=1)
    jacobi_max_steps: int = spec(100, ge=1)
    capture: bool = True
    peer: bool = True
    diffusers_loop: bool = True
    dtype: str = spec("float32", choices=("float32", "float64"))
    repeats: int = spec(3, ge=1)
    warmup: int = spec(1, ge=0)
    seed: int = spec(0, ge=0)
    trace: bool = True
    frames: tuple[int, ...] = spec((1, 2, 4, 8, 16), ge=1)
    fid_samples: int = spec(0, ge=0)
    fid_batch: int = spec(250, ge=1)
    fid_window: int = spec(0, ge=0)
    data_dir: str | None = None  # the test images of the FID (default: the data's usual place)


def _schedule(name: str) -> tuple[str, int]:
    kind, _, steps = name.partition("-")
    return kind, int(steps)


def _scheduler(base: Any, kind: str, steps: int) -> Any:
    import diffusers

    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    sched = cls.from_config(base.config)
    sched.set_timesteps(steps)
    return sched


def _problem(unet, base, name, B, cfg, device, dtype, seed=None):
    kind, steps = _schedule(name)
    sched = _scheduler(base, kind, steps)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    g = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    x_T, z = diffusion_noise(B, shape, steps, g, device, dtype)
    eta = cfg.eta if kind == "ddim" else 0.0
    return DiffusionSampling(unet, sched, x_T, z, eta=eta), sched


def _solve_row(label: str, method: str, problem: DiffusionSampling, stop: Stopping, **opts) -> Row:
    solver = get_solver(method, **opts)
    stop = stop.replace(record=False)

    def call() -> Outcome:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # a method that fails is loud
            sol = solver.solve(problem, stop)
        extra = {
            "num_evals": sol.num_evals,
            "captured": bool(sol.stats.get("captured")),
            "sweeps_run": sol.stats.get("sweeps_run", sol.num_iters),
        }
        if "capture_failed" in sol.stats:
            extra["capture_failed"] = sol.stats["capture_failed"]
        if "auto" in sol.stats:
            extra["auto"] = {k: sol.stats["auto"].get(k) for k in ("choice", "tuned", "reason")}
        return Outcome(problem.images(sol.value).flatten(1), sol.num_iters, extra)

    opts = {k: v for k, v in solver.options().items() if v is not None}
    return Row(label, solver.name, call, {**opts, "atol": stop.atol, "rule": stop.rule})


def _diffusers_row(unet, sched, problem: DiffusionSampling) -> Row:
    """The loop a diffusers user writes: unet, then scheduler.step, once per timestep."""
    ddim = problem.kind == "ddim"

    def call() -> Outcome:
        x = problem.x_T.clone()
        for i, t in enumerate(sched.timesteps):
            eps = unet(x, t).sample
            if ddim:
                noise = problem.noise[i] if problem.eta > 0 else None
                x = sched.step(eps, t, x, eta=problem.eta, variance_noise=noise).prev_sample
            else:  # DDPM's step draws its own noise: this row is timed, not compared
                x = sched.step(eps, t, x).prev_sample
        return Outcome(x.flatten(1), len(sched.timesteps), {"same_noise": ddim})

    return Row("diffusers loop", "sequential", call)


def paradigms_loop(unet, sched, problem: DiffusionSampling, window: int, tolerance: float):
    """ParaDiGMS (Shih et al. 2023, Alg. 1) around diffusers' parallel scheduler: a window
    of `window` steps evaluated in one batched call; their drifts summed from the window's
    first sample (Picard); the window slides past the steps whose squared change, per element,
    is within tolerance^2 times the noise variance; new steps start from the window's last
    sample. Returns (final sample (B, C, H, W), sweeps)."""
    import diffusers

    kind = problem.kind
    cls = diffusers.DDPMParallelScheduler if kind == "ddpm" else diffusers.DDIMParallelScheduler
    ps = cls.from_config(sched.config)
    ps.set_timesteps(len(sched.timesteps))
    ts = ps.timesteps.to(problem.x_T.device)
    T, B = len(ts), problem.B
    sigma = problem._coef["sigma"].view(T, 1, 1, 1, 1)  # the same draws, scaled as ours
    noise = torch.cat([sigma * problem.noise, torch.zeros_like(problem.noise[:1])])
    if kind == "ddim":
        noise = torch.zeros_like(noise)  # an ODE sampler for ParaDiGMS (eta 0)
    var = torch.cat([problem.noise_variance(), problem.noise_variance().new_zeros(1)])
    scale = 1.0 / (var * problem.F)  # inf for the step after the last: never "within"
    buf = problem.x_T[None].repeat(T + 1, 1, 1, 1, 1)  # (T + 1, B, C, H, W)
    begin, end, sweeps = 0, min(window, T), 0
    while begin < T:
        n = end - begin
        x = buf[begin:end]  # (n, B, C, H, W)
        t = ts[begin:end].repeat_interleave(B)
        eps = unet(x.flatten(0, 1), t).sample
        den = ps.batch_step_no_noise(eps, t, x.flatten(0, 1)).reshape(x.shape)
        new = buf[begin][None] + torch.cumsum(den - x, 0) + torch.cumsum(noise[begin:end], 0)
        err = (new - buf[begin + 1 : end + 1]).flatten(2).square().sum(-1)  # (n, B)
        bad = (err * scale[begin + 1 : end + 1, None] > tolerance**2).any(1)  # (n,)
        first = int(bad.int().argmax()) if bool(bad.any()) else n
        buf[begin + 1 : end + 1] = new
        new_begin = begin + min(first + 1, window)
        new_end = min(new_begin + window, T)
        buf[end : new_end + 1] = buf[end][None]  # new steps start from the last sample
        begin, end, sweeps = new_begin, new_end, sweeps + 1
    return buf[T], sweeps


def _peer_row(unet, sched, problem: DiffusionSampling, window: int, tol: float) -> Row:
    def call() -> Outcome:
        x, sweeps = paradigms_loop(unet, sched, problem, window, tol)
        return Outcome(x.flatten(1), sweeps, {"num_evals": None})

    label = f"paradigms (peer, window={window}) tol={tol:g}"
    return Row(label, "paradigms", call, {"window": window})


def _rows(cfg, unet, base, name, problem, sched) -> list[Row]:
    capture = "auto" if cfg.capture else False
    rows = [_solve_row("sequential", "sequential", problem, Stopping(capture=capture))]
    if cfg.diffusers_loop:
        rows.append(_diffusers_row(unet, sched, problem))
    T = problem.length
    windows = sorted({min(w, T) for w in cfg.windows})
    exact_windows = sorted({min(w, T) for w in cfg.exact_windows}) or windows
    for tol in cfg.tolerances:
        stop = Stopping(atol=tol, rule="variance", capture=capture)
        stop = stop if tol > 0 else Stopping(capture=capture)
        tag = "exact" if tol == 0 else f"tol={tol:g}"
        specs: dict[str, tuple[str, dict[str, Any]]] = {}  # label -> (method, options)
        if "jacobi" in cfg.methods and cfg.jacobi_max_steps >= T:
            specs[f"jacobi {tag}"] = ("jacobi", {})
        for W in windows if tol > 0 else exact_windows:
            if cfg.peer and tol > 0 and problem.eta == 0:
                rows.append(_peer_row(unet, sched, problem, W, tol))
            if "picard" in cfg.methods:
                specs[f"picard(window={W}) {tag}"] = ("picard", {"window": W})
            if "anderson" in cfg.methods:
                opts = {"window": W, "history": cfg.history, "base": "picard"}
                specs[f"anderson(window={W}, m={cfg.history}) {tag}"] = ("anderson", opts)
        for label, (method, opts) in specs.items():
            rows.append(_solve_row(label, method, problem, stop, **opts))
        if AUTO in cfg.methods:  # among the methods configured beside it
            among = [get_solver(m, **o) for m, o in specs.values()]
            rows.append(_solve_row(f"auto {tag}", "auto", problem, stop, methods=among or None))
    return rows


def _call_costs(unet, problem: DiffusionSampling, windows, device, repeats: int) -> dict:
    """The floor of a sweep's cost: one call of the denoiser on W x B images (captured in a
    CUDA graph on CUDA, as the captured loop replays it), median seconds, per window W and for
    one step (W = 1)."""
    from ffsolve.graphs import CapturedCall, device_can_capture

    out = {}
    B = problem.B
    for W in sorted({1, *(min(w, problem.length) for w in windows)}):
        x = problem.x_T.repeat(W, 1, 1, 1)  # (W B, C, H, W)
        t = problem.timesteps[:1].repeat(W * B)
        call = lambda x, t: unet(x, t).sample  # noqa: E731
        if device_can_capture(device):
            call = CapturedCall(call, x, t)
        times = []
        for _ in range(max(5, repeats)):
            synchronize(device)
            t0 = time.perf_counter()
            call(x, t)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        out[str(W)] = float(np.median(times))
    return out


def run(cfg: DiffusionSamplingConfig, ctx: RunContext) -> dict[str, Any]:
    from ffsolve.models.ddpm import ddpm_scheduler, load_ddpm

    device = ctx.device
    exact_arithmetic(device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    unet, mcfg, meta = load_ddpm(cfg.checkpoint, device, dtype)
    base = ddpm_scheduler(mcfg)
    for name in cfg.schedules:
        if _schedule(name)[1] > mcfg.num_train_timesteps:
            raise ConfigError(f"schedule {name} has more steps than the model's training")
    ctx.log(
        f"DDPM {cfg.checkpoint}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"parameters, {meta.get('data', {}).get('name', '?')}, {cfg.dtype}"
    )
    cases, traces = [], {}
    with torch.no_grad():
        for name in cfg.schedules:
            for B in cfg.batches:
                ctx.log(f"== {name}, batch {B}")
                problem, sched = _problem(unet, base, name, B, cfg, device, dtype)
                rows = _rows(cfg, unet, base, name, problem, sched)
                records, _ = timed_rows(
                    rows,
                    device,
                    warmup=cfg.warmup,
                    repeats=cfg.repeats,
                    reference="sequential",
                    baselines=[r.label for r in rows if r.kind == "sequential"],
                    log=ctx.log,
                    keep=ctx.keep,
                )
                for r in records:  # the per-sweep cost beside the denoiser's call on the window
                    if "error" not in r and r.get("sweeps_run"):
                        r["per_sweep_ms"] = 1e3 * r["wall_time_s"] / r["sweeps_run"]
                costs = _call_costs(unet, problem, cfg.windows, device, cfg.repeats)
                ctx.log("  denoiser call on W x B images (ms): " + ", ".join(
                    f"W={w}: {1e3 * c:.3f}" for w, c in costs.items()))  # fmt: skip
                cases.append(
                    {
                        "schedule": name,
                        "batch": B,
                        "steps": problem.length,
                        "rows": records,
                        "denoiser_call_s": costs,
                    }  # fmt: skip
                )
                if cfg.trace and cfg.batches[0] == B:
                    traces[name] = _traces(cfg, problem, records, device)
        fid = _fid(cfg, unet, base, meta, device, dtype, ctx) if cfg.fid_samples else {}
    return {
        "cases": cases,
        "traces": traces,
        "fid": fid,
        "checkpoint": cfg.checkpoint,
        "data": meta.get("data"),
        "model": {"config": meta.get("config")},
    }


def _traces(cfg, problem: DiffusionSampling, records, device) -> dict[str, Any]:
    """Per sweep, the distance of the final step's iterate to the sequential sample and a
    clock, for picard and anderson at the first nonzero tolerance (or exact); the images at
    `frames` beside the sequential loop's sample at equal wall-clock."""
    seq = get_solver("sequential").solve(problem, record=False).value
    ref = problem.images(seq)
    by = {r["method"]: r for r in records if "error" not in r}
    t_seq = by["sequential"]["wall_time_s"] / problem.length  # seconds per sequential step
    tol = next((t for t in cfg.tolerances if t > 0), 0.0)
    stop = Stopping(atol=tol, rule="variance") if tol > 0 else Stopping()
    W = min(cfg.windows[0], problem.length)
    out: dict[str, Any] = {"sequential_images": _uint8(ref)}
    for method, opts in (
        ("picard", {"window": W}),
        ("anderson", {"window": W, "history": cfg.history, "base": "picard"}),
    ):
        solver = get_solver(method, **opts)
        dist, clock, frames = [], [], {}
        start = [time.perf_counter()]

        def callback(k: int, x: torch.Tensor, frames=frames, dist=dist, clock=clock, start=start):
            synchronize(device)
            clock.append(time.perf_counter() - start[0])
            img = x[:, -1].reshape(ref.shape)
            dist.append(float((img - ref).flatten(1).norm(dim=1).mean()))
            if k in cfg.frames:
                steps = min(problem.length, round(clock[-1] / t_seq))
                seq_img = problem.x_T if steps == 0 else seq[:, steps - 1].reshape(ref.shape)
                frames[str(k)] = {
                    "images": _uint8(img),
                    "sequential_steps": steps,
                    "sequential_images": _uint8(seq_img),
                }

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sol = solver.solve(problem, stop.replace(capture=False), callback=callback)
        out[method] = {
            "l2_to_sequential": dist,
            "clock_s": clock,
            "frames": frames,
            "num_iters": sol.num_iters,
            "tolerance": tol,
        }
    return out


def _uint8(images: torch.Tensor, n: int = 4) -> list:
    """(B, C, H, W) in [-1, 1] -> the first n as uint8 nested lists (n, H, W[, C])."""
    img = ((images[:n].double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.permute(0, 2, 3, 1)
    return (img[..., 0] if img.shape[-1] == 1 else img).cpu().tolist()


def _fid(cfg, unet, base, meta, device, dtype, ctx) -> dict[str, Any]:
    """DenseNet-BC FID (NOT Inception's) of fid_samples images per setting, against the
    data's test set: the sequential loop with two seeds (its spread), picard and anderson."""
    from ffsolve.data import load_images
    from ffsolve.fid import features, fid, load_feature_net

    data = (meta.get("data") or {}).get("name", "mnist")
    test = load_images(data, cfg.data_dir)["test"][0][: cfg.fid_samples]
    net = load_feature_net(device=device)
    ref = features(net, test)
    W = cfg.fid_window or cfg.windows[0]
    out: dict[str, Any] = {
        "samples": cfg.fid_samples,
        "reference": f"{data} test",
        "features": "DenseNet-BC (Fashion-MNIST) penultimate layer",
    }
    for name in cfg.schedules:
        settings = [
            ("sequential", "sequential", {}, Stopping(), 0),
            ("sequential seed+1", "sequential", {}, Stopping(), 1),
        ]
        for tol in [t for t in cfg.tolerances if t > 0]:
            stop = Stopping(atol=tol, rule="variance")
            settings.append((f"picard tol={tol:g}", "picard", {"window": W}, stop, 0))
            settings.append(
                (
                    f"anderson tol={tol:g}",
                    "anderson",
                    {"window": W, "history": cfg.history, "base": "picard"},
                    stop,
                    0,
                )
            )
        scores = {}
        for label, method, opts, stop, shift in settings:
            images = []
            for i in range(0, cfg.fid_samples, cfg.fid_batch):
                n = min(cfg.fid_batch, cfg.fid_samples - i)
                seed = cfg.seed + 1000 * (i // cfg.fid_batch + 1) + shift
                problem, _ = _problem(unet, base, name, n, cfg, device, dtype, seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    # not timed, so not captured (capturing the sequential loop at fid_batch
                    # 1000 failed on an H100 with a CUDA error during capture)
                    sol = get_solver(method, **opts).solve(
                        problem, stop.replace(record=False, capture=False)
                    )
                images.append(problem.images(sol.value).float().cpu())
            scores[label] = fid(features(net, torch.cat(images)), ref)
            ctx.log(f"  FID (DenseNet-BC features) {name} {label}: {scores[label]:.3f}")
        out[name] = scores
    return out


def summary(records: dict[str, Any]) -> str:
    lines = []
    for case in records["cases"]:
        lines.append(f"{case['schedule']}, batch {case['batch']} ({case['steps']} steps):")
        lines.append(
            format_table(
                case["rows"],
                [("sweeps_run", "sweeps run"), ("per_sweep_ms", "ms/sweep"),
                 ("peak_mem_mb", "peak MB")],
            )
        )  # fmt: skip
        costs = case.get("denoiser_call_s") or {}
        if costs:
            lines.append("denoiser call on W x B images: " + ", ".join(
                f"W={w} {1e3 * c:.3f} ms" for w, c in costs.items()))  # fmt: skip
        lines.append("")
    for name, scores in (records.get("fid") or {}).items():
        if isinstance(scores, dict):
            shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            lines.append(f"FID on DenseNet-BC features (not Inception's), {name}: {shown}")
    lines.append(
        "iters: sweeps (the sequential rows: steps); max|diff|: final samples vs the "
        "sequential loop's (the DDPM diffusers loop draws its own noise)"
    )
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    for name, tr in (records.get("traces") or {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for method in ("picard", "anderson"):
            if method not in tr:
                continue
            d = np.maximum(tr[method]["l2_to_sequential"], 1e-12)
            axes[0].semilogy(np.arange(1, len(d) + 1), d, label=method)
            axes[1].semilogy(tr[method]["clock_s"], d, label=method)
        axes[0].set_xlabel("sweep")
        axes[1].set_xlabel("seconds (synchronised per sweep)")
        for ax in axes:
            ax.set_ylabel("mean l2 distance of the final step to the sequential sample")
            ax.legend(fontsize=8)
        fig.suptitle(f"{name}: {records.get('env', {}).get('device_name', '')}", fontsize=9)
        paths.append(save_figure(fig, out_dir / f"convergence_{name}.png"))
        frames = (tr.get("picard") or {}).get("frames") or {}
        if frames:
            keys = list(frames)
            fig, axes = plt.subplots(2, len(keys), figsize=(1.8 * len(keys), 4), squeeze=False)
            for j, k in enumerate(keys):
                f = frames[k]
                show_images(
                    axes[0, j], f["sequential_images"], 2, f"seq. {f['sequential_steps']} steps"
                )
                show_images(axes[1, j], f["images"], 2, f"picard sweep {k}")
            fig.suptitle("top: the sequential loop at equal wall-clock; bottom: picard", fontsize=8)
            paths.append(save_figure(fig, out_dir / f"frames_{name}.png", dpi=120))
    return paths


register_experiment(
    Experiment(
        name="diffusion-sampling",
        description="a DDPM sampled by sequential, Jacobi, Picard (ParaDiGMS), Anderson (ParaTAA)",
        config=DiffusionSamplingConfig,
        run=run,
        plot=plot,
        summary=summary,
        bench=(
            Case(
                "diffusion",
                (
                    "schedules=[ddim-25, ddpm-1000]",
                    "batches=[1]",
                    "trace=false",
                    "tolerances=[0.1]",
                ),
                default=False,
            ),
        ),
    )
)
