"""Running experiments and trainers: one run directory per run, and `bench` (many runs).

`execute` resolves a config, makes `runs/<name>/<timestamp>/`, runs, and writes the resolved
config, the environment, the records and the figures there. `bench` runs cases of
experiments (each an experiment with config overrides, declared by the experiment itself),
each in its own run directory under one bench folder, writing an index after every case.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffsolve import progress
from ffsolve.checkpoint import checkpoint_exists
from ffsolve.config import config_to_dict, load_config
from ffsolve.distributed import launched, process_group
from ffsolve.errors import CheckpointError, FFSolveError
from ffsolve.experiments import PARTIAL, Case, Experiment, RunContext, Trainer, all_experiments
from ffsolve.runs import environment, new_run_dir, resolve_device, write_json, write_yaml

__all__ = ["RunSpec", "bench_cases", "execute", "run_bench"]


@dataclass(frozen=True)
class RunSpec:
    """What one run is: an experiment (or trainer), a config file and overrides."""

    kind: str  # "run" or "train"
    name: str
    target: Experiment | Trainer
    config_file: str | None = None
    overrides: tuple[str, ...] = ()

    def config(self) -> Any:
        """The resolved config, checked before anything runs: ConfigError for an unknown
        field or a bad value, CheckpointError for an experiment's `checkpoint` that is not
        there."""
        config = load_config(self.target.config, self.config_file, list(self.overrides))
        if self.kind == "run":
            ckpt = getattr(config, "checkpoint", None)
            if isinstance(ckpt, str) and not checkpoint_exists(ckpt):
                raise CheckpointError(
                    f"{self.name}: no checkpoint at {ckpt} (train one with ffsolve train, "
                    "or name another with --set checkpoint=PATH)"
                )
        return config


def execute(
    spec: RunSpec,
    device_name: str = "auto",
    out: str | Path = "runs",
    *,
    force: bool = False,
    resume: bool = False,
    run_dir: Path | None = None,
) -> Path | None:
    """Resolve the config, make the run directory, run, write records and figures; returns
    the run directory. A run that fails before producing anything leaves no directory.

    Under torchrun (`ffsolve.distributed`) an experiment declared `distributed` runs on every
    rank inside one process group; only rank 0 makes the run directory, writes and prints,
    and the other ranks return None. Any other experiment or trainer is refused there."""
    config = spec.config()
    launch = launched()
    if launch.world_size > 1 and not getattr(spec.target, "distributed", False):
        raise FFSolveError(
            f"{spec.name} runs as one process; start it without torchrun "
            f"(WORLD_SIZE={launch.world_size})"
        )
    device = resolve_device(device_name)
    with process_group(device, launch) as device:
        if not launch.main:
            ctx = RunContext(device=device, out_dir=None, log=lambda _: None,
                             rank=launch.rank, world_size=launch.world_size)  # fmt: skip
            spec.target.run(config, ctx)  # the same solves as rank 0's; nothing written
            return None
        return _execute(spec, config, device, launch, out, force, resume, run_dir)


def _execute(spec, config, device, launch, out, force, resume, run_dir) -> Path:
    """`execute` on the process that writes (rank 0)."""
    run_dir = run_dir if run_dir is not None else new_run_dir(out, spec.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    write_yaml(run_dir / "config.yaml", config_to_dict(config))
    write_json(run_dir / "env.json", env)
    ctx = RunContext(device=device, out_dir=run_dir, log=progress.write, force=force,
                     resume=resume, rank=launch.rank, world_size=launch.world_size)  # fmt: skip
    ranks = f" x {launch.world_size} processes" if launch.world_size > 1 else ""
    print(f"{spec.kind} {spec.name} on {env['device_name']}{ranks} -> {run_dir}", flush=True)
    key = "experiment" if spec.kind == "run" else "model"
    head = {key: spec.name, "config": config_to_dict(config), "env": env}
    try:
        target = spec.target
        body = target.run(config, ctx) if spec.kind == "run" else target.train(config, ctx)
    except BaseException as e:
        _keep_what_was_measured(run_dir, head, e)
        raise
    records = {**head, **body}
    write_json(run_dir / "records.json", records, compact=True)
    (run_dir / PARTIAL).unlink(missing_ok=True)  # records.json holds all of it
    summary = getattr(spec.target, "summary", None)
    if summary is not None:
        print(summary(records))
    if spec.kind == "run":
        for path in spec.target.plot(records, run_dir):
            print(f"figure: {path}")
    print(f"records: {run_dir / 'records.json'}")
    return run_dir


def _keep_what_was_measured(run_dir: Path, head: dict[str, Any], error: BaseException) -> None:
    """A run that stopped early: its folder goes when it holds nothing but its config and
    environment; else the rows it finished (`partial.jsonl`) become `records.json`, marked
    interrupted, and the message says where."""
    names = {p.name for p in run_dir.iterdir()}
    if names <= {"config.yaml", "env.json"}:
        shutil.rmtree(run_dir)  # nothing was produced: leave no empty run behind
        return
    partial = run_dir / PARTIAL
    if not partial.is_file():
        return
    rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    why = f"{type(error).__name__}: {error}".rstrip(": ")
    records = {**head, "interrupted": why, "partial_rows": rows}
    write_json(run_dir / "records.json", records, compact=True)
    partial.unlink()
    print(
        f"ffsolve: stopped early ({why}); the {len(rows)} finished row(s) are kept in "
        f"{run_dir / 'records.json'}",
        file=sys.stderr,
        flush=True,
    )


def bench_cases() -> dict[str, tuple[Experiment, Case]]:
    """Every bench case that an experiment declares, by name."""
    out: dict[str, tuple[Experiment, Case]] = {}
    for exp in all_experiments().values():
        for case in exp.bench:
            if case.name in out:
                raise ValueError(f"two experiments declare the bench case {case.name!r}")
            out[case.name] = (exp, case)
    return out


def run_bench(
    names: list[str], overrides: list[str], device_name: str = "auto", out: str | Path = "runs"
) -> tuple[Path, list[str]]:
    """Run the named bench cases (default: the default ones), each in its own run directory
    under `runs/bench/<timestamp>/`; an override `key=value` applies to every case,
    `case:key=value` to that case only.

    Every case's config is resolved before the first one runs (a bad override fails at
    once). An index (`bench.json`: case -> experiment, run directory, status) is written after
    each case, so an interrupted bench keeps what it measured.

    Returns:
        (the bench folder, the names of the cases that failed).
    """
    cases = bench_cases()
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise FFSolveError(f"unknown bench case(s) {', '.join(unknown)}; valid: {', '.join(cases)}")
    chosen = list(dict.fromkeys(names or [n for n, (_, c) in cases.items() if c.default]))
    common, per_case = [], {n: [] for n in chosen}
    for item in overrides:
        case, sep, rest = item.partition(":")
        if sep and "=" not in case:
            if case not in per_case:
                raise FFSolveError(f"--set {item!r}: {case!r} is not a case of this bench")
            per_case[case].append(rest)
        else:
            common.append(item)
    specs = {}
    for n in chosen:
        exp, case = cases[n]
        specs[n] = RunSpec("run", exp.name, exp, None, (*case.overrides, *common, *per_case[n]))
    for n, spec in specs.items():
        try:
            spec.config()  # every override checked before the first case runs
        except FFSolveError as e:
            raise FFSolveError(f"bench case {n}: {e}") from None
    folder = new_run_dir(out, "bench")
    index: dict[str, Any] = {"cases": {}}
    failed = []
    for name, spec in specs.items():
        print(f"== {name} ({spec.name})", flush=True)
        entry: dict[str, Any] = {"experiment": spec.name, "overrides": list(spec.overrides)}
        try:
            run_dir = execute(spec, device_name, out, run_dir=folder / name)
            entry.update(status="done", run_dir=name)
        except (KeyboardInterrupt, SystemExit):
            entry["status"] = "interrupted"
            index["cases"][name] = entry
            write_json(folder / "bench.json", index)
            raise
        except Exception as e:  # the next case still runs; the failure is in the index
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            print(f"ffsolve: bench: {name} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
        index["cases"][name] = entry
        write_json(folder / "bench.json", index)
        if entry["status"] == "done":
            print(f"case {name}: {run_dir}", flush=True)
    print(f"bench: {folder / 'bench.json'}")
    return folder, failed
