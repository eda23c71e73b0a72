"""Will parallel pay on this device? The cost of one Jacobi iteration against the whole
sequential loop, for a causal MLP of several lengths and batch sizes.

break_even_iters = sequential time / time per Jacobi iteration: Jacobi is faster than the
sequential loop whenever it converges in fewer iterations than that. Both are measured.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffsolve.bench import measure
from ffsolve.config import Config, spec
from ffsolve.experiments import Case, Experiment, RunContext, Step, register_experiment
from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.plots import plt, save_figure
from ffsolve.problems import FunctionProblem
from ffsolve.progress import track
from ffsolve.runtime import DTYPE_NAMES, dtype_of, exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, get_solver


@dataclass(frozen=True)
class BreakEvenConfig(Config):
    lengths: tuple[int, ...] = spec((64, 256, 1024), ge=1)
    batches: tuple[int, ...] = spec((1, 16, 128), ge=1)
    channels: int = spec(1, ge=1)
    hidden: int = spec(512, ge=1)
    probe_iters: int = spec(8, ge=1)  # Jacobi iterations timed to get the cost of one
    dtype: str = spec("float32", choices=DTYPE_NAMES)
    repeats: int = spec(3, ge=1)
    seed: int = spec(0, ge=0)


def run(cfg: BreakEvenConfig, ctx: RunContext) -> dict[str, Any]:
    exact_arithmetic(ctx.device)
    dtype = dtype_of(cfg.dtype)
    seq, jac = get_solver("sequential"), get_solver("jacobi")
    rows = []
    for T in track(cfg.lengths, desc="lengths", unit="length"):  # updates between timings
        model_cfg = CausalMLPConfig(T, cfg.channels, cfg.hidden, 2, 1.0, cfg.seed)
        model = CausalMLP(model_cfg).to(device=ctx.device, dtype=dtype).eval()
        for B in cfg.batches:
            x0 = torch.zeros(B, T, cfg.channels, device=ctx.device, dtype=dtype)
            problem = FunctionProblem(model, x0)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t_seq = measure(
                    lambda p=problem: seq.solve(p, record=False), ctx.device, 1, cfg.repeats
                )["median_s"]
                n = min(cfg.probe_iters, T)
                t_jac = measure(
                    lambda p=problem, n=n: jac.solve(p, max_iters=n, record=False),
                    ctx.device,
                    1,
                    cfg.repeats,
                )["median_s"]
            per_iter = t_jac / n
            row = {
                "length": T,
                "batch": B,
                "sequential_s": t_seq,
                "jacobi_iter_s": per_iter,
                "break_even_iters": t_seq / per_iter,
            }
            rows.append(row)
            ctx.keep(row)
            ctx.log(
                f"  T={T:<6} B={B:<5} sequential {t_seq:8.4f} s   one Jacobi iteration "
                f"{per_iter * 1e3:8.3f} ms   break-even {row['break_even_iters']:7.1f} iterations"
            )
    return {"rows": rows}


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = records["rows"]
    for B in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == B]
        ax.loglog(
            [r["length"] for r in sel],
            [r["break_even_iters"] for r in sel],
            "o-",
            label=f"batch {B}",
        )
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("break-even Jacobi iterations (measured)")
    ax.set_title(f"{records['env']['device_name']}")
    ax.legend()
    return [save_figure(fig, out_dir / "break_even.png")]


def summary(records: dict[str, Any]) -> str:
    lines = ["Jacobi beats the sequential loop when it converges in fewer iterations than:"]
    for r in records["rows"]:
        lines.append(f"  T={r['length']:<6} batch={r['batch']:<5} {r['break_even_iters']:8.1f}")
    return "\n".join(lines)


register_experiment(
    Experiment(
        name="breakeven",
        description="cost of one Jacobi iteration vs the sequential loop (will parallel pay?)",
        config=BreakEvenConfig,
        run=run,
        plot=plot,
        summary=summary,
        steps=(Step("breakeven"),),
        bench=(Case("breakeven", ("repeats=7",)),),
    )
)
