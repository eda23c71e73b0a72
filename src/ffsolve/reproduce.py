"""`ffsolve reproduce`: every experiment's paper configuration in turn, then one markdown
report that sets each measured number beside the paper's (MISSION.md's table).

Each experiment writes its own run directory as usual; the report (REPORT.md, in
`runs/reproduce/<timestamp>/`) links their figures and names the device, torch version,
date and commit. A step that fails is reported and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ffsolve.runs import environment, new_run_dir, resolve_device

#: the paper's numbers (Song et al. 2021, from the original notebooks; MISSION.md)
PAPER = {
    "made-mnist": {"sequential_s": 0.343, "iters": 31, "jacobi_s": 0.0126, "speedup": 27.2},
    "made-rgb": {"sequential_s": 3.03, "iters": 92, "jacobi_s": 0.119, "speedup": 25.3},
    "rnn-backprop": {"iters": "10-30", "training_speedup": "about 2x"},
}


def _made_rows(records: dict[str, Any], key: str) -> list[str]:
    from ffsolve.experiments.made_sampling import NAIVE

    by = {m["method"]: m for m in records["methods"]}
    jac = by.get("jacobi")
    naive = by.get(NAIVE)
    if jac is None:
        return [f"| {key} | no jacobi row | | | |"]
    strongest = by[jac["strongest_baseline"]]
    p = PAPER[key]
    paper_seq = f"{p['sequential_s']:.3g} s"
    ours_seq = f"{strongest['wall_time_s']:.3g} s ({strongest['method']})"
    if naive is not None and naive is not strongest:
        ours_seq += f"; naive {naive['wall_time_s']:.3g} s"
    return [
        f"| {key} | sequential | {paper_seq} | {ours_seq} |",
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
        if not m["method"].startswith("jacobi"):
            continue
        it = m.get("mean_iters_per_step")
        rows.append(
            f"| rnn-backprop | {m['method']}: iterations / training speed-up vs BPTT | "
            f"{p['iters']} / {p['training_speedup']} | "
            f"{'-' if it is None else f'{it:.1f}'} / {m['speedup_vs_bptt']:.2f}x |"
        )
    return rows


def reproduce(args: argparse.Namespace, execute: Callable[..., Path]) -> Path:
    """Run the paper configurations with `execute` (the CLI's run helper); write REPORT.md."""
    from ffsolve.experiments import get_experiment

    device = resolve_device(args.device)
    steps: list[tuple[str, str, list[str], Callable[[dict], list[str]] | None]] = [
        (
            "made-mnist",
            "made-sampling",
            ["checkpoint=checkpoints/made_mnist", "batch=100"],
            lambda r: _made_rows(r, "made-mnist"),
        ),
        (
            "made-rgb",
            "made-sampling",
            [f"checkpoint={args.rgb_checkpoint}", "batch=100", "block_size=96", "window=384"],
            lambda r: _made_rows(r, "made-rgb"),
        ),
        (
            "rnn-backprop",
            "rnn-backprop",
            [f"data_dir={args.mnist_dir}"] if args.mnist_dir else [],
            _rnn_rows,
        ),
        ("breakeven", "breakeven", [], None),
    ]
    report_dir = new_run_dir(args.out, "reproduce")
    env = environment(device)
    table = ["| setting | quantity | paper | measured here |", "|---|---|---|---|"]
    sections = []
    extra: dict[str, list[str]] = {}
    for item in args.override:  # STEP:KEY=VALUE, e.g. rnn-backprop:steps=20
        step, sep, kv = item.partition(":")
        if not sep or step not in {k for k, *_ in steps}:
            raise ValueError(
                f"--override {item!r}: expected STEP:KEY=VALUE with STEP one of "
                f"{', '.join(k for k, *_ in steps)}"
            )
        extra.setdefault(step, []).append(kv)
    for key, name, overrides, rows in steps:
        overrides = [*overrides, *extra.get(key, [])]
        # the last checkpoint= wins (an --override comes after the step's default)
        ckpts = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
        rgb = ckpts[-1] if ckpts else ""
        if key == "made-rgb" and not Path(rgb + ".safetensors").is_file():
            sections.append(f"## {key}\n\nskipped: no checkpoint at {rgb}\n")
            continue
        run_args = argparse.Namespace(
            config=None, set=[], device=args.device, out=args.out, traceback=False
        )
        try:
            run_dir = execute("run", name, get_experiment(name), run_args, overrides)
        except Exception as e:  # the next step still runs
            traceback.print_exc()
            sections.append(f"## {key}\n\nfailed: {type(e).__name__}: {e}\n")
            continue
        records = json.loads((run_dir / "records.json").read_text())
        if rows is not None:
            table += rows(records)
        summary = getattr(get_experiment(name), "summary", None)
        figures = sorted(p.name for p in run_dir.glob("*.png"))
        rel = Path("..") / ".." / run_dir.relative_to(Path(args.out))
        sections.append(
            f"## {key}\n\nrun: `{run_dir}`\n\n"
            + (f"```\n{summary(records)}\n```\n\n" if summary else "")
            + "".join(f"![{f}]({rel / f})\n" for f in figures)
        )
    head = (
        "# ffsolve: the paper's experiments, reproduced\n\n"
        f"Device: {env['device_name']}; torch {env['torch']}; date {env.get('date', '')}; "
        f"commit {env['commit']}.\n\n"
        "Paper numbers: Song, Meng, Liao, Ermon (ICML 2021), from the original notebooks "
        "(MISSION.md). The paper's MADE speed-ups are against its naive sequential loop.\n\n"
    )
    text = head + "\n".join(table) + "\n\n" + "\n".join(sections)
    (report_dir / "REPORT.md").write_text(text)
    print(f"report: {report_dir / 'REPORT.md'}")
    return report_dir
