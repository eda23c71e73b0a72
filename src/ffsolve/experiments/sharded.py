"""One solve across several GPUs (or CPU processes): `Sharded` against one device.

Run it as one process per GPU under torchrun (see `ffsolve.distributed`):

    torchrun --nproc-per-node 4 -m ffsolve run sharded --device cuda

or without torchrun (world size 1). Every rank builds the same problems (same weights, inputs
and noise, seeded) and runs every solve; rank 0 times, compares and writes the run folder.

Cases:

- `ddpm-1000`, `ddim-100` (`schedules`) at batch 1 on the DDPM of `checkpoint`: `picard` and
  `anderson` (base picard) over Picard's map, each at every window of `windows`, stopped at
  ParaDiGMS's tolerance (`tolerance`, the noise-variance rule).
- `gru-forward-T<gru_length>`: a GRU forward (hidden `hidden`, batch 1, weights scaled by 0.5
  so the cell contracts, as a trained one does) by `jacobi` at max-abs change `atol`.
- the sharded linear solves on the same GRU at T = `linear_length`: `quasi_newton` and
  `newton` on the forward, `scan` on its BPTT adjoint (random dL/dh), each with one chunk of
  Jacobians per call (`chunk = linear_length`: a rank's slice is never scanned twice).

At world size 1 every case also times the sequential loop (`sequential`, captured in a CUDA
graph where the problem allows: the baseline); at world size N the methods run on
`Sharded(problem)`, each sweep's positions split over the ranks. The sequential answer is
computed on every rank (untimed there) as the reference.

Per row: the median time of `repeats` calls after `warmup` (synchronised, the ranks lined up
by a barrier before each call), sweeps, whether the loop was captured, whether it converged,
the max-abs difference from the sequential answer over every position (`max_diff`) and at
the last one (`max_diff_last`: the sample of a diffusion case, whose earlier positions a
tolerance of 0.1 leaves further off). The records hold
the world size and the process group's backend; env.json the GPU, torch and commit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ffsolve.bench import measure
from ffsolve.config import Config, spec
from ffsolve.errors import ConfigError
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.plots import plt, save_figure
from ffsolve.problems import (
    DiffusionSampling,
    Problem,
    RecurrenceAdjoint,
    RecurrenceForward,
    Sharded,
    diffusion_noise,
)
from ffsolve.problems.recurrence import torch_cell_jacobian
from ffsolve.runtime import exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, Stopping, get_solver

__all__ = ["ShardedConfig", "plot", "run", "summary"]

#: the label of the baseline row (world size 1 only)
SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class ShardedConfig(Config):
    """Sizes of the sharded measurement (defaults: the GPU run; configs/sharded_tiny.yaml: a
    CPU proof in seconds).

    Attributes:
        checkpoint: the DDPM of the diffusion cases.
        schedules: "ddpm-STEPS" / "ddim-STEPS" sampled at batch 1 ([]: no diffusion case).
        windows: Picard's and Anderson's windows.
        tolerance: ParaDiGMS's tolerance (the noise-variance rule) of the diffusion cases.
        hidden: the GRU's hidden size (and input size).
        gru_length: T of the GRU forward by Jacobi (0: no such case).
        linear_length: T of the GRU's newton, quasi_newton and scan cases (0: none).
        atol: max-abs change at which the GRU cases stop.
        repeats, warmup: timing (median of repeats after warmup calls).
        seed: weights, inputs and noise (the same on every rank).
    """

    checkpoint: str = "checkpoints/ddpm_mnist"
    schedules: tuple[str, ...] = ("ddpm-1000", "ddim-100")
    windows: tuple[int, ...] = spec((32, 64, 128), ge=1)
    tolerance: float = spec(0.1, gt=0.0)
    hidden: int = spec(256, ge=1)
    gru_length: int = spec(1_000_000, ge=0)
    linear_length: int = spec(4096, ge=0)
    atol: float = spec(1e-5, ge=0.0)
    repeats: int = spec(3, ge=1)
    warmup: int = spec(1, ge=0)
    seed: int = spec(0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.schedules:
            _schedule(name)  # a bad name fails before any run folder is made


@dataclass(frozen=True)
class _Case:
    """One problem and the methods run on it: (label, method, options)."""

    name: str
    problem: Problem
    stop: Stopping
    methods: tuple[tuple[str, str, dict[str, Any]], ...]


def _schedule(name: str) -> tuple[str, int]:
    kind, _, steps = name.partition("-")
    if kind not in ("ddpm", "ddim") or not steps.isdigit() or int(steps) < 1:
        raise ConfigError(f"schedules: {name!r} is not ddpm-STEPS or ddim-STEPS")
    return kind, int(steps)


def _diffusion_cases(cfg: ShardedConfig, device: torch.device, log) -> list[_Case]:
    if not cfg.schedules:
        return []
    import diffusers

    from ffsolve.models.ddpm import ddpm_scheduler, load_ddpm

    unet, mcfg, _ = load_ddpm(cfg.checkpoint, device)
    base = ddpm_scheduler(mcfg)
    log(f"DDPM {cfg.checkpoint}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    cases = []
    for name in cfg.schedules:
        kind, steps = _schedule(name)
        if steps > mcfg.num_train_timesteps:
            raise ConfigError(f"schedule {name} has more steps than the model's training")
        cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
        sched = cls.from_config(base.config)
        sched.set_timesteps(steps)
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        g = torch.Generator().manual_seed(cfg.seed)
        x_T, z = diffusion_noise(1, shape, steps, g, device)
        stop = Stopping(atol=cfg.tolerance, rule="variance", record=False)
        methods = [(f"picard(window={w})", "picard", {"window": w}) for w in cfg.windows]
        methods += [
            (f"anderson(window={w})", "anderson", {"window": w, "base": "picard"})
            for w in cfg.windows
        ]
        cases.append(_Case(name, DiffusionSampling(unet, sched, x_T, z), stop, tuple(methods)))
    return cases


def _gru_cases(cfg: ShardedConfig, device: torch.device) -> list[_Case]:
    H, T, n = cfg.hidden, cfg.gru_length, cfg.linear_length
    if not T and not n:
        return []
    with torch.random.fork_rng(devices=[]):  # torch's default init, seeded, global RNG untouched
        torch.manual_seed(cfg.seed)
        cell = torch.nn.GRUCell(H, H)
    with torch.no_grad():  # a contracting cell, as a trained one is
        for p in cell.parameters():
            p.mul_(0.5)
    cell = cell.to(device).requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    xs = torch.randn(1, max(T, n), H, generator=g).to(device)  # (1, T, H)
    h0 = torch.zeros(1, H, device=device)
    stop = Stopping(atol=cfg.atol, record=False)
    cases = []
    if T:
        forward = RecurrenceForward(cell, h0, xs[:, :T])
        cases.append(_Case(f"gru-forward-T{T}", forward, stop, (("jacobi", "jacobi", {}),)))
    if n:
        # each rank forms the Jacobians of its own positions only, one chunk of them
        short = RecurrenceForward(cell, h0, xs[:, :n])
        newtons = tuple((m, m, {"chunk": n}) for m in ("quasi_newton", "newton"))
        cases.append(_Case(f"gru-forward-T{n}", short, stop, newtons))
        hs = get_solver("sequential").solve(short, record=False).value  # (1, n, H)
        h_prev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)  # (1, n, H): h_0..h_{n-1}
        grad_h = torch.randn(1, n, H, generator=torch.Generator().manual_seed(cfg.seed + 1))
        adjoint = RecurrenceAdjoint(lambda h, x: cell(x, h), h_prev, xs[:, :n],
                                    grad_h.to(device), jacobian=torch_cell_jacobian(cell),
                                    structure=cell)  # fmt: skip
        cases.append(_Case(f"gru-adjoint-T{n}", adjoint, stop, (("scan", "scan", {"chunk": n}),)))
    return cases


def _timed(fn, device: torch.device, cfg: ShardedConfig, world: int) -> dict[str, Any]:
    """`bench.measure` with the ranks lined up (a barrier) before every call."""
    line_up = dist.barrier if world > 1 else None
    if line_up is not None:
        line_up()
    return measure(fn, device, warmup=cfg.warmup, repeats=cfg.repeats, tick=line_up)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _case_rows(case: _Case, cfg: ShardedConfig, ctx: RunContext) -> list[dict[str, Any]]:
    device, world = ctx.device, ctx.world_size
    rows = []
    sequential = lambda: get_solver("sequential").solve(case.problem, record=False)  # noqa: E731
    if world == 1:  # the baseline: the sequential loop, captured where the problem allows
        m = _timed(sequential, device, cfg, world)
        reference = m["result"].value
        rows.append({"case": case.name, "method": SEQUENTIAL, "time_s": m["median_s"],
                     "iters": m["result"].num_iters, "max_diff": 0.0, "max_diff_last": 0.0,
                     "captured": bool(m["result"].stats.get("captured"))})  # fmt: skip
    else:
        reference = sequential().value  # every rank: the same work, no rank waits on another
    target = case.problem if world == 1 else Sharded(case.problem)
    for label, method, opts in case.methods:
        solver = get_solver(method, **opts)
        m = _timed(lambda s=solver: s.solve(target, case.stop), device, cfg, world)
        sol = m["result"]
        rows.append({"case": case.name, "method": label, "time_s": m["median_s"],
                     "iters": sol.num_iters, "max_diff": _max_diff(sol.value, reference),
                     "max_diff_last": _max_diff(sol.value[:, -1], reference[:, -1]),
                     "captured": bool(sol.stats.get("captured")),
                     "converged": bool(sol.all_converged)})  # fmt: skip
    return rows


def run(cfg: ShardedConfig, ctx: RunContext) -> dict[str, Any]:
    """Every case's methods, sharded over the run's processes; see the module doc."""
    device, world = ctx.device, ctx.world_size
    exact_arithmetic(device)  # differences are measured: no TF32
    backend = dist.get_backend() if world > 1 else None
    ctx.log(f"world size {world}" + (f" ({backend})" if backend else ""))
    rows: list[dict[str, Any]] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as `converged`
        cases = [*_diffusion_cases(cfg, device, ctx.log), *_gru_cases(cfg, device)]
        for case in cases:
            ctx.log(f"== {case.name}")
            for row in _case_rows(case, cfg, ctx):
                ctx.log(f"  {row['method']:<22} {1e3 * row['time_s']:11.2f} ms  "
                        f"iters {row['iters']:<7} diff {row['max_diff']:.1e} "
                        f"(last {row['max_diff_last']:.1e})")  # fmt: skip
                ctx.keep(row)
                rows.append({"world_size": world, **row})
    return {"world_size": world, "backend": backend, "rows": rows}


def summary(records: dict[str, Any]) -> str:
    world = records["world_size"]
    lines = [
        f"world size {world} on {records['env']['device_name']}",
        f"{'case':<22} {'method':<22} {'ms':>11} {'iters':>7} {'max diff':>9} {'last':>9}",
    ]
    base = {r["case"]: r["time_s"] for r in records["rows"] if r["method"] == SEQUENTIAL}
    for r in records["rows"]:
        speed = f"  {base[r['case']] / r['time_s']:.2f}x" if r["case"] in base else ""
        lines.append(
            f"{r['case']:<22} {r['method']:<22} {1e3 * r['time_s']:11.2f} {r['iters']:>7} "
            f"{r['max_diff']:9.1e} {r['max_diff_last']:9.1e}{speed}"
        )
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time per method, one panel per case (one run is one world size: compare runs' figures
    or records for the scaling)."""
    rows = records["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return []
    cols = min(3, len(cases))
    fig, axes = plt.subplots(math.ceil(len(cases) / cols), cols, squeeze=False,
                             figsize=(4.5 * cols, 3.2 * math.ceil(len(cases) / cols)))  # fmt: skip
    for ax, case in zip(axes.flat, cases, strict=False):
        sel = [r for r in rows if r["case"] == case]
        ax.barh([r["method"] for r in sel], [r["time_s"] for r in sel])
        ax.set_xscale("log")
        ax.set_xlabel("seconds")
        ax.set_title(case, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.suptitle(f"sharded, world size {records['world_size']} on {records['env']['device_name']}")
    return [save_figure(fig, out_dir / "sharded.png")]


register_experiment(
    Experiment(
        name="sharded",
        description="one solve split over torchrun's processes (Sharded) vs one device",
        config=ShardedConfig,
        run=run,
        plot=plot,
        summary=summary,
        distributed=True,
    )
)
