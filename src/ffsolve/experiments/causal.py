"""The built-in triangular system: a random causal MLP solved by every method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffsolve.bench import MethodSpec, compare, format_table
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.plots import plot_traces
from ffsolve.problems.base import FunctionProblem


@dataclass(frozen=True)
class CausalConfig:
    length: int = 256
    channels: int = 4
    hidden: int = 512
    depth: int = 2
    gain: float = 1.5
    batch: int = 16
    block_size: int = 16
    window: int = 32
    dtype: str = "float32"
    repeats: int = 3
    seed: int = 0


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def run(cfg: CausalConfig, ctx: RunContext) -> dict[str, Any]:
    dtype = dtype_of(cfg.dtype)
    model_cfg = CausalMLPConfig(cfg.length, cfg.channels, cfg.hidden, cfg.depth, cfg.gain, cfg.seed)
    model = CausalMLP(model_cfg).to(device=ctx.device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    x0 = torch.randn(cfg.batch, cfg.length, cfg.channels, generator=g).to(ctx.device, dtype)
    problem = FunctionProblem(model, x0, dim=1)
    specs = [
        MethodSpec.of("sequential", "sequential"),
        MethodSpec.of("jacobi", "jacobi"),
        MethodSpec.of(f"jacobi_gs(block={cfg.block_size})", "jacobi_gs", block_size=cfg.block_size),
        MethodSpec.of(f"gs_jacobi(block={cfg.block_size})", "gs_jacobi", block_size=cfg.block_size),
        MethodSpec.of(f"gs_jacobi(window={cfg.window})", "gs_jacobi", window=cfg.window),
    ]
    ctx.log(f"causal MLP: T={cfg.length}, C={cfg.channels}, batch={cfg.batch}, {cfg.dtype}")
    records, _ = compare(problem, specs, ctx.device, repeats=cfg.repeats, log=ctx.log)
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
