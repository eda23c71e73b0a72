"""`ffsolve run causal-net`: a random causal MLP (a dense triangular system) by every method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffsolve.bench import format_table, solver_row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.errors import ConfigError
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.plots import plot_traces
from ffsolve.problems import FunctionProblem
from ffsolve.runtime import DTYPE_NAMES, dtype_of, exact_arithmetic


@dataclass(frozen=True)
class CausalConfig(Config):
    length: int = spec(256, ge=1)
    channels: int = spec(4, ge=1)
    hidden: int = spec(512, ge=1)
    depth: int = spec(2, ge=1)
    gain: float = spec(1.5, ge=0.0)
    batch: int = spec(16, ge=1)
    block_size: int = spec(16, ge=1)  # jacobi_gs and gs_jacobi blocks, at most length
    window: int = spec(32, ge=1)
    dtype: str = spec("float32", choices=DTYPE_NAMES)
    repeats: int = spec(3, ge=1)
    seed: int = spec(0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size > self.length:
            raise ConfigError(
                f"CausalConfig.block_size={self.block_size} is larger than length={self.length}"
            )


def run(cfg: CausalConfig, ctx: RunContext) -> dict[str, Any]:
    exact_arithmetic(ctx.device)
    dtype = dtype_of(cfg.dtype)
    model_cfg = CausalMLPConfig(cfg.length, cfg.channels, cfg.hidden, cfg.depth, cfg.gain, cfg.seed)
    model = CausalMLP(model_cfg).to(device=ctx.device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    x0 = torch.randn(cfg.batch, cfg.length, cfg.channels, generator=g).to(ctx.device, dtype)
    problem = FunctionProblem(model, x0, dim=1)
    K, W = cfg.block_size, cfg.window
    rows = [
        solver_row("sequential", "sequential", problem),
        solver_row("jacobi", "jacobi", problem),
        solver_row(f"jacobi_gs(block={K})", "jacobi_gs", problem, block_size=K),
        solver_row(f"gs_jacobi(block={K})", "gs_jacobi", problem, block_size=K),
        solver_row(f"gs_jacobi(window={W})", "gs_jacobi", problem, window=W),
    ]
    ctx.log(f"causal MLP: T={cfg.length}, C={cfg.channels}, batch={cfg.batch}, {cfg.dtype}")
    records, outcomes = timed_rows(
        rows, ctx.device, repeats=cfg.repeats, log=ctx.log, keep=ctx.keep
    )
    ref = outcomes["sequential"].value
    for row, rec in zip(rows, records, strict=True):
        if row.kind != "sequential" and "error" not in rec:
            rec["traces"] = row.trace(ref, ctx.device)
            rec["traces"].pop("snapshots")
    return {"methods": records, "length": cfg.length}


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    path = out_dir / "convergence.png"
    title = f"causal MLP, T={records['length']}"
    return [plot_traces(records["methods"], path, title, records["length"])]


def summary(records: dict[str, Any]) -> str:
    return format_table(records["methods"])


register_experiment(
    Experiment(
        name="causal-net",
        description="a random causal MLP (dense triangular system) solved by every method",
        config=CausalConfig,
        run=run,
        plot=plot,
        summary=summary,
    )
)
