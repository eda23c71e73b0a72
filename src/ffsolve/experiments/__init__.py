"""Experiments and trainers, each one module that registers itself; found by discovery.

An experiment module holds a config dataclass, `run(config, ctx) -> records`,
`plot(records, out_dir) -> paths` and `summary(records) -> str`, and says where it takes
part beyond `ffsolve run`: the runs `ffsolve reproduce` makes of it (`steps`) with the rows it
sets beside the paper's numbers (`paper`), and the cases of `ffsolve bench` (`bench`). Every
module of this package is imported by `all_experiments()`, so a new experiment is one new
module (plus its config file): nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ffsolve.checkpoint import strict_json

#: the file of rows kept as a run goes (see `RunContext.keep`)
PARTIAL = "partial.jsonl"

__all__ = [
    "Case",
    "DEMO",
    "DEMOS",
    "Experiment",
    "RunContext",
    "Step",
    "Trainer",
    "all_experiments",
    "all_trainers",
    "get_experiment",
    "get_trainer",
    "register_experiment",
    "register_trainer",
]


@dataclass(frozen=True)
class RunContext:
    """What a run gets besides its config: the device, its output folder, a logger, and for
    trainers the command line's --force (overwrite an existing checkpoint) and --resume
    (continue from the resume state saved next to the checkpoint).

    A run started by torchrun is one of `world_size` processes (see `ffsolve.distributed`);
    only rank 0 has a run folder and a logger that prints: on the other ranks `out_dir` is
    None, `log` prints nothing and `keep` keeps nothing (`main` says which one this is)."""

    device: torch.device
    out_dir: Path | None
    log: Callable[[str], None] = print
    force: bool = False
    resume: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0; the only one without torchrun)."""
        return self.rank == 0

    def keep(self, record: dict[str, Any]) -> None:
        """Append one finished row (a measurement) to `partial.jsonl` in the run folder, as
        it is made: a run stopped early keeps what it measured (`records.json` replaces the
        file when the run ends). Nothing on a rank other than 0."""
        if self.out_dir is None:
            return
        with open(self.out_dir / PARTIAL, "a", encoding="utf-8") as f:
            f.write(strict_json(record, indent=None) + "\n")


@dataclass(frozen=True)
class Step:
    """One run `ffsolve reproduce` makes of an experiment.

    Attributes:
        key: its name in the report (e.g. "made-mnist").
        overrides: `key=value` config fields on top of `config`.
        config: a config file under the repository's `configs/`, or None.
        data: the data set it reads ("mnist", "fashion-mnist"), whose folder reproduce's
            `--mnist-dir` / `--fmnist-dir` set as `data_dir`.
        checkpoint: the checkpoint it reads (documentation; every step's config is checked,
            checkpoint included, before the first step runs).
    """

    key: str
    overrides: tuple[str, ...] = ()
    config: str | None = None
    data: str | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class Case:
    """One case of `ffsolve bench`: the experiment run with these overrides.

    Attributes:
        name: the case's name on the command line (e.g. "made-mnist").
        overrides: `key=value` config fields.
        default: run by `ffsolve bench` when no case is named.
    """

    name: str
    overrides: tuple[str, ...] = ()
    default: bool = True


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see the module docstring).

    Attributes:
        paper: (records, step key) -> markdown rows `| setting | quantity | paper | ours |`
            for the report's table beside the paper's numbers (None: no paper counterpart).
        distributed: runs as several processes under torchrun (every rank runs `run`, rank 0
            writes; see `ffsolve.distributed`). Any other experiment is refused there.
    """

    name: str
    description: str
    config: type
    run: Callable[[Any, RunContext], dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], list[Path]]
    summary: Callable[[dict[str, Any]], str] | None = None
    paper: Callable[[dict[str, Any], str], list[str]] | None = None
    steps: tuple[Step, ...] = ()
    bench: tuple[Case, ...] = ()
    distributed: bool = False


@dataclass(frozen=True)
class Trainer:
    name: str
    description: str
    config: type
    train: Callable[[Any, RunContext], dict[str, Any]]
    summary: Callable[[dict[str, Any]], str] | None = None


EXPERIMENTS: dict[str, Experiment] = {}
TRAINERS: dict[str, Trainer] = {}

#: What `ffsolve demo [NAME]` runs: an experiment name and config overrides per demo; the
#: first is `make demo`'s.
DEMOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "made": (
        "made-sampling",
        ("checkpoint=checkpoints/made_mnist", "batch=36", "repeats=3", "grid_images=36"),
    ),
    "lm": (
        "lm-decoding",
        (
            "kinds=[code]",
            "prompts_per_kind=1",
            "batches=[1]",
            "new_tokens=[96]",
            "temperatures=[0.0]",
            "baselines=[sequential]",
            "methods=[lookahead]",
            "warmup=0",
            "show=true",
        ),
    ),  # fmt: skip
}
DEMO = DEMOS["made"]


def register_experiment(exp: Experiment) -> Experiment:
    """Add an experiment to the table (a second one of the same name is an error)."""
    old = EXPERIMENTS.get(exp.name)
    if old is not None and old.run.__module__ != exp.run.__module__:
        raise ValueError(
            f"two experiments named {exp.name!r} ({old.run.__module__}, {exp.run.__module__})"
        )
    EXPERIMENTS[exp.name] = exp
    return exp


def register_trainer(trainer: Trainer) -> Trainer:
    """Add a trainer to the table (a second one of the same name is an error)."""
    old = TRAINERS.get(trainer.name)
    if old is not None and old.train.__module__ != trainer.train.__module__:
        raise ValueError(f"two trainers named {trainer.name!r}")
    TRAINERS[trainer.name] = trainer
    return trainer


def discover() -> list[str]:
    """Import every module of this package (each registers what it holds); their names."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
            names.append(info.name)
    return names


def get_experiment(name: str) -> Experiment:
    discover()
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def get_trainer(name: str) -> Trainer:
    discover()
    if name not in TRAINERS:
        valid = ", ".join(sorted(TRAINERS)) or "none yet"
        raise ValueError(f"unknown model {name!r} to train; valid: {valid}")
    return TRAINERS[name]


def all_experiments() -> dict[str, Experiment]:
    discover()
    return dict(EXPERIMENTS)


def all_trainers() -> dict[str, Trainer]:
    discover()
    return dict(TRAINERS)
