"""The built-in triangular system: a random causal MLP solved by every method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffsolve.bench import MethodSpec, compare, format_table
from ffsolve.config import Config, spec
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.plots import plot_traces
from ffsolve.problems.base import FunctionProblem

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = tuple(_DTYPES)


@dataclass(frozen=True)
class CausalConfig(Config):
    length: int = spec(256, ge=1)
    channels: int = spec(4, ge=1)
    hidden: int = spec(512, ge=1)
    depth: int = spec(2, ge=1)
    gain: float = spec(1.5, ge=0.0)
    batch: int = spec(16, ge=1)
    block_size: int = spec(16, ge=1)  # at most length (checked by the solver)
    window: int = spec(32, ge=1)
    dtype: str = spec("float32", choices=DTYPE_NAMES)
    repeats: int = spec(3, ge=1)
    seed: int = spec(0, ge=0)


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
