"""Experiments and trainers, each registered by name; the command line looks them up here.

An experiment is one module with a config dataclass, `run(config, ctx) -> records` and
`plot(records, out_dir) -> paths`; it registers itself with `register_experiment`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Experiment",
    "Trainer",
    "RunContext",
    "DEMO",
    "EXPERIMENTS",
    "TRAINERS",
    "register_experiment",
    "register_trainer",
    "get_experiment",
    "get_trainer",
]


@dataclass(frozen=True)
class RunContext:
    """What a run gets besides its config: the device, its output folder, a logger, and for
    trainers the command line's --force (overwrite an existing checkpoint) and --resume
    (continue from the resume state saved next to the checkpoint)."""

    device: torch.device
    out_dir: Path
    log: Callable[[str], None] = print
    force: bool = False
    resume: bool = False


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config: type
    run: Callable[[Any, RunContext], dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], list[Path]]
    summary: Callable[[dict[str, Any]], str] | None = None  # the table printed after a run


@dataclass(frozen=True)
class Trainer:
    name: str
    description: str
    config: type
    train: Callable[[Any, RunContext], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str] | None = None


EXPERIMENTS: dict[str, Experiment] = {}
TRAINERS: dict[str, Trainer] = {}

# Modules that register experiments or trainers when imported.
_MODULES = [
    "ffsolve.experiments.causal",
    "ffsolve.experiments.breakeven",
    "ffsolve.experiments.made_train",
    "ffsolve.experiments.made_sampling",
    "ffsolve.experiments.rnn_backprop",
    "ffsolve.experiments.pixelcnn_train",
    "ffsolve.experiments.pixelcnn_sampling",
    "ffsolve.experiments.densenet_train",
    "ffsolve.experiments.densenet_jacobi",
    "ffsolve.experiments.rnn_forward",
    "ffsolve.experiments.bench_suite",
    "ffsolve.experiments.gru_char_train",
]

#: What `ffsolve demo` / `make demo` runs: an experiment name and config overrides.
DEMO: tuple[str, tuple[str, ...]] = (
    "made-sampling",
    ("checkpoint=checkpoints/made_mnist", "batch=36", "repeats=3", "grid_images=36"),
)


def register_experiment(exp: Experiment) -> Experiment:
    EXPERIMENTS[exp.name] = exp
    return exp


def register_trainer(trainer: Trainer) -> Trainer:
    TRAINERS[trainer.name] = trainer
    return trainer


def _load() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def get_experiment(name: str) -> Experiment:
    _load()
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def get_trainer(name: str) -> Trainer:
    _load()
    if name not in TRAINERS:
        valid = ", ".join(sorted(TRAINERS)) or "none yet"
        raise ValueError(f"unknown model {name!r} to train; valid: {valid}")
    return TRAINERS[name]


def all_experiments() -> dict[str, Experiment]:
    _load()
    return dict(EXPERIMENTS)


def all_trainers() -> dict[str, Trainer]:
    _load()
    return dict(TRAINERS)
