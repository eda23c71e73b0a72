"""`ffsolve reproduce`: the paper's experiments in their paper configurations, then one
markdown report that sets each measured number beside the paper's (MISSION.md's table).

Steps (`STEPS`): MADE MNIST and 3072 dims, RNN back-propagation, the break-even benchmark,
PixelCNN++ MNIST and 32x32 RGB (plain and cached sequential, Jacobi, Jacobi-GS, GS-Jacobi),
DenseNet-BC (trained) and DenseNet-201 (random weights). Each step writes its own run
directory as usual; a step that fails is reported and the next one still runs.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffsolve.errors import FFSolveError
from ffsolve.runs import environment, new_run_dir, read_records, resolve_device

#: the paper's numbers (Song et al. 2021, from the original notebooks; MISSION.md)
PAPER: dict[str, dict[str, Any]] = {
    "made-mnist": {"sequential_s": 0.343, "iters": 31, "jacobi_s": 0.0126, "speedup": 27.2},
    "made-rgb": {"sequential_s": 3.03, "iters": 92, "jacobi_s": 0.119, "speedup": 25.3},
    "rnn-backprop": {"iters": "10-30", "training_speedup": "about 2x"},
    "pixelcnn-mnist": {
        "seconds": {
            "sequential": 12.15,
            "sequential-cached": 8.23,
            "jacobi": 1.94,
            "gs_jacobi": 1.86,
            "jacobi_gs": 5.95,
        },  # fmt: skip
        "best_vs_cached": 4.4,
    },
    "pixelcnn-rgb": {
        "seconds": {
            "sequential": 30.95,
            "sequential-cached": 17.76,
            "jacobi": 26.16,
            "jacobi_gs": 14.76,
            "gs_jacobi": 14.87,
        },  # fmt: skip
        "best_vs_cached": 1.2,
    },
    "densenet-201": {"sequential_s": 0.0279, "jacobi_s": 0.0131, "speedup": 2.13},
}


def _made_rows(records: dict[str, Any], key: str) -> list[str]:
    from ffsolve.experiments.made_sampling import NAIVE

    by = {m["method"]: m for m in records["methods"]}
    jac = by.get("jacobi")
    naive = by.get(NAIVE)
    if jac is None:
        return [f"| {key} | no jacobi row | | |"]
    strongest = by[jac["strongest_baseline"]]
    p = PAPER[key]
    ours_seq = f"{strongest['wall_time_s']:.3g} s ({strongest['method']})"
    if naive is not None and naive is not strongest:
        ours_seq += f"; naive {naive['wall_time_s']:.3g} s"
    return [
        f"| {key} | sequential | {p['sequential_s']:.3g} s | {ours_seq} |",
        f"| {key} | Jacobi iterations | {p['iters']} | {jac['num_iters']} |",
        f"| {key} | Jacobi time | {p['jacobi_s']:.3g} s | {jac['wall_time_s']:.3g} s |",
        f"| {key} | speed-up | {p['speedup']}x (vs the naive loop) | "
        f"{jac['speedup_vs_sequential']:.1f}x vs the strongest"
        + (f", {naive['wall_time_s'] / jac['wall_time_s']:.1f}x vs naive |" if naive else " |"),
    ]


def _rnn_rows(records: dict[str, Any]) -> list[str]:
    p = PAPER["rnn-backprop"]
    rows = []
    for m in records["methods"]:
        if m["method"] == "bptt" or m["method"].startswith("autograd"):
            continue
        it = m.get("mean_iters_per_step")
        rows.append(
            f"| rnn-backprop | {m['method']}: iterations / training speed-up vs BPTT | "
            f"{p['iters']} / {p['training_speedup']} | "
            f"{'-' if it is None else f'{it:.1f}'} / {m['speedup_vs_bptt']:.2f}x |"
        )
    return rows


def _pixelcnn_rows(records: dict[str, Any], key: str) -> list[str]:
    p = PAPER[key]
    rows, cached, best = [], None, None
    for m in records["methods"]:
        label = m["method"]
        paper = p["seconds"].get(label, p["seconds"].get(m["solver"]))
        if label == "sequential-cached":
            cached = m
        elif m["solver"] != "sequential" and (
            best is None or m["wall_time_s"] < best["wall_time_s"]
        ):
            best = m
        extra = f", {m['num_iters']} iterations" if m["solver"] != "sequential" else ""
        rows.append(
            f"| {key} | {label} | {'' if paper is None else f'{paper:.3g} s'} | "
            f"{m['wall_time_s']:.3g} s{extra} |"
        )
    if cached is not None and best is not None:
        rows.append(
            f"| {key} | best parallel vs cached sequential | {p['best_vs_cached']}x | "
            f"{cached['wall_time_s'] / best['wall_time_s']:.2f}x ({best['method']}) |"
        )
    return rows


def _densenet_rows(records: dict[str, Any], key: str) -> list[str]:
    rows = []
    for pb in records["batches"]:
        measured = [r for r in pb["rows"] if r["seconds"] and not r.get("estimate")]
        seq = [r for r in measured if r["method"].startswith("sequential")]
        online = [
            r for r in measured if r["method"].startswith("jacobi") and "fixed" not in r["method"]
        ]
        estimates = [r for r in pb["rows"] if r.get("estimate") and "atol" in r["method"]]
        if not seq or not online:
            continue
        s = min(seq, key=lambda r: r["seconds"])
        j = min(online, key=lambda r: r["seconds"])
        p = PAPER.get(key, {})
        paper = (
            f"{p['sequential_s']} s vs {p['jacobi_s']} s: {p['speedup']}x, simulated" if p else ""
        )
        text = (
            f"{s['method']} {s['seconds'] * 1e3:.3g} ms; fastest measured Jacobi "
            f"({j['method']}, {j['iters']} sweeps) {j['seconds'] * 1e3:.3g} ms: "
            f"**{s['seconds'] / j['seconds']:.2f}x**"
        )
        if estimates:
            e = min(estimates, key=lambda r: r["seconds"])
            text += f"; the paper's ESTIMATE on these timings {s['seconds'] / e['seconds']:.2f}x"
        paper = paper if pb["batch"] == 1 else ""
        rows.append(f"| {key} | batch {pb['batch']} | {paper} | {text} |")
    return rows


@dataclass(frozen=True)
class Step:
    key: str
    experiment: str
    overrides: Callable[[argparse.Namespace], list[str]] = lambda args: []
    rows: Callable[[dict[str, Any]], list[str]] | None = None
    config: str | None = None  # a config file under the repository's configs/


def _missing_checkpoint(path: str) -> str | None:
    return None if Path(path + ".safetensors").is_file() else f"no checkpoint at {path}"


STEPS: tuple[Step, ...] = (
    Step("made-mnist", "made-sampling",
         lambda a: ["checkpoint=checkpoints/made_mnist", "batch=100"],
         lambda r: _made_rows(r, "made-mnist")),
    Step("made-rgb", "made-sampling",
         lambda a: [f"checkpoint={a.rgb_checkpoint}", "batch=100", "block_size=96", "window=384"],
         lambda r: _made_rows(r, "made-rgb")),
    Step("rnn-backprop", "rnn-backprop",
         lambda a: [f"data_dir={a.mnist_dir}"] if a.mnist_dir else [], _rnn_rows),
    Step("breakeven", "breakeven"),
    Step("pixelcnn-mnist", "pixelcnn-sampling", rows=lambda r: _pixelcnn_rows(r, "pixelcnn-mnist"),
         config="configs/pixelcnn_sampling_mnist.yaml"),
    Step("pixelcnn-rgb", "pixelcnn-sampling", rows=lambda r: _pixelcnn_rows(r, "pixelcnn-rgb"),
         config="configs/pixelcnn_sampling_rgb.yaml"),
    Step("densenet-bc", "densenet-jacobi",
         lambda a: [f"data_dir={a.fmnist_dir}"] if a.fmnist_dir else [],
         lambda r: _densenet_rows(r, "densenet-bc"), config="configs/densenet_jacobi.yaml"),
    Step("densenet-201", "densenet-jacobi",
         lambda a: ["checkpoint=null", "arch=densenet201", "batches=[1, 16]", "repeats=3"],
         lambda r: _densenet_rows(r, "densenet-201"), config="configs/densenet_jacobi.yaml"),
)  # fmt: skip
STEP_KEYS = tuple(s.key for s in STEPS)


def _parse_pairs(items: list[str], flag: str, sep: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        step, ok, value = item.partition(sep)
        if not ok or step not in STEP_KEYS or not value:
            raise FFSolveError(
                f"{flag} {item!r}: expected STEP{sep}VALUE with STEP one of {', '.join(STEP_KEYS)}"
            )
        out.setdefault(step, []).append(value)
    return out


def _selected(args: argparse.Namespace, given: dict[str, Path]) -> list[Step]:
    keys = list(args.steps or given or STEP_KEYS)
    unknown = [k for k in keys if k not in STEP_KEYS]
    if unknown:
        raise FFSolveError(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(STEP_KEYS)}")
    return [s for s in STEPS if s.key in keys]


def _env_line(records: dict[str, Any]) -> str:
    env = records.get("env", {})
    return (
        f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}; "
        f"{env.get('date', '?')}; commit {env.get('commit', '?')}"
    )


def reproduce(args: argparse.Namespace, execute: Callable[..., Path]) -> Path:
    """Run (or, with --from, reuse) the selected steps; write the report; return its path."""
    from ffsolve.experiments import get_experiment

    extra = _parse_pairs(args.override, "--override", ":")
    given = {k: Path(v[-1]) for k, v in _parse_pairs(args.from_runs, "--from", "=").items()}
    for key, path in given.items():
        if not (path / "records.json").is_file() and not (path / "records.json.gz").is_file():
            raise FFSolveError(f"--from {key}={path}: no records.json there")
    steps = _selected(args, given)
    device = resolve_device(args.device)
    if args.report:
        report = Path(args.report)
        report.parent.mkdir(parents=True, exist_ok=True)
    else:
        report = new_run_dir(args.out, "reproduce") / "REPORT.md"
    table = ["| setting | quantity | paper | measured here |", "|---|---|---|---|"]
    sections, run_envs = [], []
    for step in steps:
        if step.key in given:
            run_dir = given[step.key]
        else:
            overrides = [*step.overrides(args), *extra.get(step.key, [])]
            ckpts = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
            why = _missing_checkpoint(ckpts[-1]) if ckpts and ckpts[-1] != "null" else None
            if why:
                sections.append(f"## {step.key}\n\nskipped: {why}\n")
                continue
            run_args = argparse.Namespace(
                config=step.config, set=[], device=args.device, out=args.out, traceback=False
            )
            try:
                run_dir = execute(
                    "run", step.experiment, get_experiment(step.experiment), run_args, overrides
                )
            except Exception as e:  # the next step still runs
                if isinstance(e, FFSolveError):  # bad input or missing data: one line
                    print(f"ffsolve: reproduce: {step.key} failed: {e}", file=sys.stderr)
                else:  # a bug: the traceback helps
                    traceback.print_exc()
                sections.append(f"## {step.key}\n\nfailed: {type(e).__name__}: {e}\n")
                continue
        records = read_records(run_dir)
        run_envs.append(records.get("env", {}))
        if step.rows is not None:
            table += step.rows(records)
        summary = getattr(get_experiment(step.experiment), "summary", None)
        figures = sorted(p.name for p in run_dir.glob("*.png"))
        rel = Path(os.path.relpath(run_dir.resolve(), report.parent.resolve()))
        sections.append(
            f"## {step.key}\n\nrun: `{rel}` ({_env_line(records)})\n\n"
            + (f"```\n{summary(records)}\n```\n\n" if summary else "")
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
        "Paper numbers: Song, Meng, Liao, Ermon (ICML 2021), from the original notebooks "
        "(MISSION.md); its timings were extrapolated, ours are measured with online stopping. "
        "The paper's MADE speed-ups are against its naive sequential loop; ours are against "
        "the strongest sequential baseline measured in the same process.\n\n"
    )
    report.write_text(head + "\n".join(table) + "\n\n" + "\n".join(sections))
    print(f"report: {report}")
    return report
