"""`ffsolve reproduce`: the paper's experiments in their paper configurations, then one
markdown report that sets each measured number beside the paper's.

The steps are those the experiments declare (`Experiment.steps`), each with the rows it sets
beside the paper's numbers (`Experiment.paper`); this module only collects them. Each step
writes its own run directory as usual; a step that fails is reported and the next one still
runs, and the command then exits non-zero.

A GPU call is limited in time, so a report can also be put together from runs made
earlier, in several calls: `--from STEP=RUN_DIR` uses that run instead of running the step,
and `--report PATH` writes the report there (figure links relative to it), for example the
repository's RESULTS.md. Every section names its own run's device, torch version, date and
commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffsolve.checkpoint import atomic_write_text
from ffsolve.errors import FFSolveError
from ffsolve.experiments import Experiment, Step, all_experiments
from ffsolve.runner import RunSpec, execute
from ffsolve.runs import environment, new_run_dir, read_records, resolve_device

__all__ = ["all_steps", "reproduce"]

#: reproduce's folder options: the data set a step reads -> (flag's attribute, config field)
_DATA_DIRS = {"mnist": "mnist_dir", "fashion-mnist": "fmnist_dir"}


@dataclass(frozen=True)
class _Planned:
    step: Step
    experiment: Experiment
    overrides: tuple[str, ...]


def all_steps() -> dict[str, tuple[Experiment, Step]]:
    """Every reproduce step that an experiment declares, by key (discovery order)."""
    out: dict[str, tuple[Experiment, Step]] = {}
    for exp in all_experiments().values():
        for step in exp.steps:
            if step.key in out:
                raise ValueError(f"two experiments declare the reproduce step {step.key!r}")
            out[step.key] = (exp, step)
    return out


def _parse_pairs(items: list[str], flag: str, sep: str, keys) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        step, ok, value = item.partition(sep)
        if not ok or step not in keys or not value:
            raise FFSolveError(
                f"{flag} {item!r}: expected STEP{sep}VALUE with STEP one of {', '.join(keys)}"
            )
        out.setdefault(step, []).append(value)
    return out


def _env_line(records: dict[str, Any]) -> str:
    env = records.get("env", {})
    return (
        f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}; "
        f"{env.get('date', '?')}; commit {env.get('commit', '?')}"
    )


def _plan(args: argparse.Namespace, steps, given: dict[str, Path]) -> list[_Planned]:
    """The steps to run with their overrides, every config resolved now (before any runs)."""
    keys = list(args.steps or given or steps)
    unknown = [k for k in keys if k not in steps]
    if unknown:
        raise FFSolveError(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(steps)}")
    extra = _parse_pairs(args.override, "--override", ":", list(steps))
    plan = []
    for key in steps:
        if key not in keys:
            continue
        exp, step = steps[key]
        over = list(step.overrides)
        folder = getattr(args, _DATA_DIRS.get(step.data or "", ""), None)
        if folder:
            over.append(f"data_dir={folder}")
        if key == "made-rgb" and args.rgb_checkpoint:
            over.append(f"checkpoint={args.rgb_checkpoint}")
        over += extra.get(key, [])
        planned = _Planned(step, exp, tuple(over))
        if key not in given:
            try:
                RunSpec("run", exp.name, exp, step.config, planned.overrides).config()
            except FFSolveError as e:
                raise FFSolveError(f"reproduce step {key}: {e}") from None
        plan.append(planned)
    return plan


def reproduce(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Run (or, with --from, reuse) the selected steps and write the report.

    Returns:
        (the report's path, the keys of the steps that failed).
    """
    steps = all_steps()
    given = {
        k: Path(v[-1]) for k, v in _parse_pairs(args.from_runs, "--from", "=", list(steps)).items()
    }
    for key, path in given.items():
        if not (path / "records.json").is_file() and not (path / "records.json.gz").is_file():
            raise FFSolveError(f"--from {key}={path}: no records.json there")
        exp = steps[key][0].name
        found = read_records(path).get("experiment")
        if found != exp:
            raise FFSolveError(
                f"--from {key}={path}: records of {found!r}, step {key} needs a {exp!r} run"
            )
    plan = _plan(args, steps, given)
    device = resolve_device(args.device)
    if args.report:
        report = Path(args.report)
        report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report, "")  # writable: found out now, not after every step ran
    else:
        report = new_run_dir(args.out, "reproduce") / "REPORT.md"
    table = ["| setting | quantity | paper | measured here |", "|---|---|---|---|"]
    sections, run_envs, failed = [], [], []
    for p in plan:
        key = p.step.key
        if key in given:
            run_dir = given[key]
        else:
            spec = RunSpec("run", p.experiment.name, p.experiment, p.step.config, p.overrides)
            try:
                run_dir = execute(spec, args.device, args.out)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # the next step still runs
                if isinstance(e, FFSolveError):  # bad input or missing data: one line
                    print(f"ffsolve: reproduce: {key} failed: {e}", file=sys.stderr)
                else:  # a bug: the traceback helps
                    traceback.print_exc()
                sections.append(f"## {key}\n\nfailed: {type(e).__name__}: {e}\n")
                failed.append(key)
                continue
        records = read_records(run_dir)
        run_envs.append(records.get("env", {}))
        try:
            if p.experiment.paper is not None:
                table += p.experiment.paper(records, key)
            summary = p.experiment.summary(records) if p.experiment.summary else None
        except (KeyError, TypeError, ValueError) as e:
            raise FFSolveError(
                f"{run_dir}: its records are not those of a {p.experiment.name!r} run this "
                f"version reads (missing {e})"
            ) from None
        figures = sorted(f.name for f in Path(run_dir).glob("*.png"))
        rel = Path(os.path.relpath(Path(run_dir).resolve(), report.parent.resolve()))
        sections.append(
            f"## {key}\n\nrun: `{rel}` ({_env_line(records)})\n\n"
            + (f"```\n{summary}\n```\n\n" if summary else "")
            + "".join(f"![{f}]({(rel / f).as_posix()})\n" for f in figures)
        )
    env = environment(device)
    measured_on = sorted({f"{e.get('device_name')} (torch {e.get('torch')})" for e in run_envs})
    commits = sorted({str(e.get("commit")) for e in run_envs})
    head = (
        "# ffsolve: the paper's experiments, reproduced\n\n"
        f"**Measured on {', '.join(measured_on) or 'nothing (every step failed)'}**, "
        f"at commit{'s' if len(commits) > 1 else ''} {', '.join(commits) or '-'}. "
        "Each section names the device, torch version, date and commit of its own run; runs "
        "made in earlier calls are reused with `--from`. This report was written by "
        f"`ffsolve reproduce` on {env['device_name']}, {env.get('date', '')}, commit "
        f"{env['commit']}.\n\n"
        "Paper numbers: Song, Meng, Liao, Ermon (ICML 2021), from the original notebooks; its "
        "timings were extrapolated, ours are measured with online stopping. The paper's MADE "
        "speed-ups are against its naive sequential loop; ours are against the strongest "
        "sequential baseline measured in the same process.\n\n"
    )
    atomic_write_text(report, head + "\n".join(table) + "\n\n" + "\n".join(sections))
    print(f"report: {report}")
    return report, failed
