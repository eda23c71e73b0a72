"""`ffsolve run densenet-jacobi`: the paper's DenseNet experiment, timed for real.

For each batch size: the sequential forward (eager, and replayed from a CUDA graph on CUDA),
Jacobi over the dense layers with online stopping (exact, atol = 0, and with a tolerance),
each with the per-layer sweep and the fused sweeps (one batched GEMM for the bottlenecks and
one grouped conv, or im2col + one batched GEMM, for the 3x3 convs of a block), on CUDA the
solver loop captured in CUDA graphs (online stopping, a host read per chunk) and the fixed
number of sweeps the tolerance needed captured in one graph, and beside them the paper's
simulated number, labelled an estimate: the slowest single dense layer's time times the
iteration count. Untimed traced runs give, per iteration, the top-5 agreement with the
sequential prediction (the five largest logits), the logit l2 error, the forward difference
and the first iteration from which the predicted class no longer changes.

With `arch: densenet201` the weights are random (no ImageNet weights here): its timings are
real, its convergence curve says nothing about a trained network. `inputs: noise` feeds
seeded Gaussian images instead of the checkpoint's test set (no data set needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ffsolve.bench import Outcome, Row, measure, timed_rows
from ffsolve.config import Config, spec
from ffsolve.data import load_images
from ffsolve.errors import ConfigError
from ffsolve.experiments import Case, Experiment, RunContext, Step, register_experiment
from ffsolve.graphs import CapturedCall
from ffsolve.models.densenet import DenseNet, densenet_config, load_densenet
from ffsolve.plots import plot_curves
from ffsolve.problems import DenseNetLayers
from ffsolve.problems.densenet import prediction_metrics, stable_from
from ffsolve.runtime import exact_arithmetic
from ffsolve.solvers import Stopping, get_solver


@dataclass(frozen=True)
class DenseNetJacobiConfig(Config):
    checkpoint: str | None = None  # a trained DenseNet (ffsolve train densenet)
    arch: str | None = spec(None, choices=("densenet121", "densenet169", "densenet201"))
    image_size: int = spec(224, ge=8)  # noise images (`arch`, or inputs=noise)
    inputs: str = spec("data", choices=("data", "noise"))  # a checkpoint's test set, or noise
    data_dir: str | None = None  # test images of the checkpoint's data set
    batches: tuple[int, ...] = spec((1, 64), ge=1)
    dtype: str = spec("float32", choices=("float32", "float64"))
    atol: float = spec(1e-3, ge=0)  # the tolerance rows (the exact rows use 0)
    check_every: int | None = spec(None, ge=1)  # host reads of the captured loop (None: 16, 4)
    # layer: per-layer loop; fused: one GEMM + one grouped conv per block; fused-unfold: the
    # 3x3 convs as im2col + one batched GEMM instead
    sweeps: tuple[str, ...] = spec(
        ("layer", "fused", "fused-unfold"), choices=("layer", "fused", "fused-unfold")
    )
    capture: bool = True  # CUDA-graph rows on CUDA
    trace: bool = True  # per-iteration traces and the paper's estimate (untimed)
    auto: bool = False  # rows of method="auto" (the layer loop or Jacobi), per sweep and atol
    warmup: int = spec(1, ge=0)
    repeats: int = spec(5, ge=1)
    seed: int = spec(0, ge=0)


def sweep_options(sweep: str) -> dict[str, Any]:
    """DenseNetLayers options of a sweep name."""
    return {
        "fused": sweep != "layer",
        "conv3x3": "unfold" if sweep == "fused-unfold" else "grouped",
    }


def _model(cfg: DenseNetJacobiConfig, ctx: RunContext) -> tuple[DenseNet, dict[str, Any]]:
    if (cfg.checkpoint is None) == (cfg.arch is None):
        raise ConfigError("give exactly one of checkpoint= (trained) or arch= (random weights)")
    if cfg.checkpoint is not None:
        model, meta = load_densenet(cfg.checkpoint)
        info = {"name": cfg.checkpoint, "weights": "trained", **{k: meta.get(k) for k in (
            "data", "test_accuracy")}}  # fmt: skip
    else:
        torch.manual_seed(cfg.seed)
        model = DenseNet(densenet_config(cfg.arch)).eval()
        info = {"name": cfg.arch, "weights": "random (convergence curve not meaningful)"}
    info["num_layers"] = model.num_layers
    info["num_params"] = sum(p.numel() for p in model.parameters())
    info["inputs"] = "test images" if cfg.checkpoint and cfg.inputs == "data" else "noise"
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    return model.to(device=ctx.device, dtype=dtype).eval(), info


def _images(cfg: DenseNetJacobiConfig, model: DenseNet, info: dict, n: int) -> torch.Tensor:
    """(n, C, H, W) inputs: the first n test images of the checkpoint's data, else seeded
    Gaussian noise images at image_size (random weights, or inputs=noise)."""
    data = info.get("data")
    if cfg.checkpoint is not None and data and cfg.inputs == "data":
        x = load_images(data["name"], cfg.data_dir)["test"][0][:n]
        x = torch.from_numpy(np.array(x)).float().div(255.0).unsqueeze(1)
        x = (x - data["mean"]) / data["std"]
        if len(x) < n:
            x = x.repeat(-(-n // len(x)), 1, 1, 1)[:n]
        return x
    g = torch.Generator().manual_seed(cfg.seed)
    s = cfg.image_size
    return torch.randn(n, model.config.in_channels, s, s, generator=g)


def _fixed_sweeps(problem: DenseNetLayers, images: torch.Tensor, n: int) -> torch.Tensor:
    """Stem, n full Jacobi sweeps from zero, head: the solve with a known iteration count,
    with no host read (so it can be captured)."""
    problem.set_images(images)
    x = problem.initial()
    for _ in range(n):
        x = problem.evaluate(x, 0, problem.length)
    return problem.logits(x)


def _trace(problem: DenseNetLayers, images: Tensor, ref: Tensor, atol: float) -> dict[str, Any]:
    """An untimed solve to exactness, with per-iteration prediction metrics."""
    rows: list[dict[str, Any]] = []
    prev = [None]

    def callback(k: int, x: torch.Tensor) -> None:
        logits = problem.logits(x)
        rows.append({"iter": k, **prediction_metrics(logits, ref, prev[0])})
        prev[0] = logits

    problem.set_images(images)
    sol = get_solver("jacobi").solve(problem, record=True, capture=False, callback=callback)
    preds = [r.pop("top1") for r in rows]
    residual = sol.residuals.double().amax(1).tolist()  # (num_iters,)
    for r, res in zip(rows, residual, strict=False):
        r["forward_diff"] = res
    tol_iter = next((i + 1 for i, v in enumerate(residual) if v <= atol), len(residual))
    top5_iter = next(
        (i + 1 for i in range(len(rows)) if all(r["top5_exact"] == 1 for r in rows[i:])),
        len(rows),
    )
    return {
        "per_iter": rows,
        "num_iters": sol.num_iters,
        "prediction_stable_from": stable_from(preds),
        "top5_stable_from": top5_iter,
        "tolerance_iter": tol_iter,
    }


def _jacobi_row(
    label: str, problem: DenseNetLayers, images: Tensor, stop: Stopping, method: str = "jacobi"
) -> Row:
    """Stem (part of the forward), Jacobi over the layers (or `method`), head: logits and
    sweeps."""
    solver = get_solver(method, **({"methods": ["jacobi"]} if method == "auto" else {}))

    def call() -> Outcome:
        problem.set_images(images)
        sol = solver.solve(problem, stop.replace(record=False))
        extra = {"converged": sol.all_converged}
        if "auto" in sol.stats:
            extra["auto"] = {k: sol.stats["auto"].get(k) for k in ("choice", "tuned", "reason")}
        return Outcome(problem.logits(sol.value), sol.num_iters, extra)

    return Row(label, solver.name, call, {"atol": stop.atol})


def _forward_rows(model: DenseNet, images: Tensor, cuda: bool, log) -> list[Row]:
    L = model.num_layers
    rows = [Row("sequential forward (eager)", "sequential", lambda: Outcome(model(images), L))]
    if cuda:
        try:
            fwd = CapturedCall(model, images, warmup=2)
            rows.append(
                Row("sequential forward (CUDA graph)", "sequential",
                    lambda: Outcome(fwd(images), L))
            )  # fmt: skip
        except RuntimeError as e:  # log and go on with the eager rows
            log(f"  CUDA graph of the forward failed: {e}")
    return rows


def _sweep_rows(model, images, sweep, trace, cfg, cuda, log) -> list[Row]:
    """The rows of one sweep kind: eager Jacobi (exact and atol), on CUDA the captured loop
    (exact and atol) and the atol trace's fixed number of sweeps in one graph."""
    opts = sweep_options(sweep)
    eager = DenseNetLayers(model, images, **opts)  # BN folded once, untimed
    rows = []
    for atol in (0.0, cfg.atol):
        name = "exact" if atol == 0 else f"atol={atol:g}"
        stop = Stopping(atol=atol, capture=False)
        rows.append(_jacobi_row(f"jacobi {sweep} sweep, {name}", eager, images, stop))
        if cfg.auto:  # the layer loop or Jacobi, chosen by method="auto" (captured if it can)
            stop = stop.replace(capture="auto" if cuda and cfg.capture else False)
            p = DenseNetLayers(model, images, **opts)
            rows.append(_jacobi_row(f"auto {sweep} sweep, {name}", p, images, stop, "auto"))
    if not (cuda and cfg.capture):
        return rows
    for atol in (0.0, cfg.atol):
        name = "exact" if atol == 0 else f"atol={atol:g}"
        stop = Stopping(atol=atol, capture=True, check_every=cfg.check_every)
        label = f"jacobi {sweep} sweep, {name} (captured loop, online)"
        rows.append(_jacobi_row(label, DenseNetLayers(model, images, **opts), images, stop))
    if trace is not None:
        n = trace["tolerance_iter"]
        p = DenseNetLayers(model, images, **opts)
        try:
            fixed = CapturedCall(lambda im, p=p, n=n: _fixed_sweeps(p, im, n), images, warmup=2)
        except RuntimeError as e:  # capture can fail on some kernels: log, go on
            log(f"  CUDA graph of the {sweep} sweep failed: {e}")
            return rows
        rows.append(
            Row(f"jacobi {sweep} sweep, {n} sweeps (CUDA graph, fixed)", "jacobi",
                lambda: Outcome(fixed(images), n), {"note": "the atol trace's count, no stop"})
        )  # fmt: skip
    return rows


def run(cfg: DenseNetJacobiConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    exact_arithmetic(device)  # equality is checked: no TF32
    model, info = _model(cfg, ctx)
    dtype = next(model.parameters()).dtype
    cuda = device.type == "cuda"
    ctx.log(f"model {info['name']}: {info['num_layers']} dense layers, weights {info['weights']}")
    per_batch = []
    for B in cfg.batches:
        ctx.log(f" batch {B}")
        images = _images(cfg, model, info, B).to(device=device, dtype=dtype)
        with torch.no_grad():
            ref = model(images)
            traces = {}
            if cfg.trace:
                for sweep in cfg.sweeps:
                    problem = DenseNetLayers(model, images, **sweep_options(sweep))
                    traces[sweep] = _trace(problem, images, ref, cfg.atol)
            rows = _forward_rows(model, images, cuda and cfg.capture, ctx.log)
            for sweep in cfg.sweeps:
                rows += _sweep_rows(model, images, sweep, traces.get(sweep), cfg, cuda, ctx.log)
            records, outcomes = timed_rows(
                rows, device, warmup=cfg.warmup, repeats=cfg.repeats, log=ctx.log, keep=ctx.keep
            )
            for rec in records:
                if rec["method"] in outcomes and rec["solver"] != "sequential":
                    top = prediction_metrics(outcomes[rec["method"]].value, ref, None)
                    rec.update(top5_agree=top["top5_agree"], top1_agree=top["top1_agree"])
            slowest = None
            if cfg.trace:  # the paper's simulation: the slowest dense layer x the iterations
                slowest = _slowest_layer(model, images, device, cfg)
                records += _estimates(records, traces, slowest, cfg.atol)
        per_batch.append(
            {"batch": B, "rows": records, "traces": traces, "slowest_layer_s": slowest}
        )
    return {"model": info, "batches": per_batch}


def _estimates(records, traces, slowest: float, atol: float) -> list[dict[str, Any]]:
    """The paper's ESTIMATE (not a measurement): slowest layer x iterations, per trace."""
    seq = [r for r in records if r["solver"] == "sequential" and "wall_time_s" in r]
    best = min((r["wall_time_s"] for r in seq), default=None)
    out = []
    for sweep, tr in traces.items():
        for what, n in (
            ("top-5 stable", tr["top5_stable_from"]),
            (f"atol={atol:g}", tr["tolerance_iter"]),
        ):
            t = slowest * n
            out.append({
                "method": f"ESTIMATE slowest layer x {n} ({what}, {sweep} trace)",
                "solver": "estimate", "estimate": True, "num_iters": n, "wall_time_s": t,
                "speedup_vs_sequential": None if best is None else best / t,
            })  # fmt: skip
    return out


def _slowest_layer(model: DenseNet, images: torch.Tensor, device, cfg) -> float:
    """Median time of each dense layer alone on its real input; the maximum."""
    feats = model.stem(images)
    worst = 0.0
    for b, block in enumerate(model.dense_blocks()):
        cat = feats
        for layer in block.values():
            m = measure(lambda layer=layer, cat=cat: layer(cat), device, cfg.warmup, cfg.repeats)
            worst = max(worst, m["median_s"])
            cat = torch.cat([cat, m["result"]], 1)
        if b < len(model.transitions()):
            feats = model.transitions()[b](cat)
    return worst


def _seconds(r: dict[str, Any]) -> float | None:
    return r.get("wall_time_s", r.get("seconds"))  # "seconds": records before 2026-12


def _iters(r: dict[str, Any]) -> Any:
    return r.get("num_iters", r.get("iters"))


def summary(records: dict[str, Any]) -> str:
    m = records["model"]
    lines = [f"{m['name']} ({m['num_layers']} dense layers, weights {m['weights']})"]
    head = f"{'batch':>5}  {'method':<66} {'ms':>10} {'iters':>6} {'vs best':>8} {'max|diff|':>9}"
    lines += [head, "-" * len(head)]
    for pb in records["batches"]:
        for r in pb["rows"]:
            if "error" in r:
                lines.append(f"{pb['batch']:>5}  {r['method']:<66} FAILED: {r['error'][:60]}")
                continue
            vb = r.get("speedup_vs_sequential", r.get("speedup_vs_best_sequential"))
            vb = f"{vb:.2f}x" if vb else ""
            d = r.get("max_abs_diff_vs_sequential", r.get("max_abs_diff"))
            lines.append(
                f"{pb['batch']:>5}  {r['method']:<66} {_seconds(r) * 1e3:>10.3f} "
                f"{_iters(r)!s:>6} {vb:>8} {'' if d is None else f'{d:.1e}':>9}"
            )
        for sweep, tr in pb["traces"].items():
            lines.append(
                f"{pb['batch']:>5}  {sweep} trace: prediction stable from iteration "
                f"{tr['prediction_stable_from']}, top-5 from {tr['top5_stable_from']}, "
                f"forward difference <= atol at {tr['tolerance_iter']}, exact at "
                f"{tr['num_iters']}"
            )
    lines.append("vs best: against the faster sequential forward; max|diff|: logits vs eager")
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    m = records["model"]
    title = f"{m['name']}, weights {m['weights']}: Jacobi over {m['num_layers']} dense layers"
    panels = [("top5_agree", "top-5 agreement with sequential", False),
              ("logit_l2", "logit l2 error (mean over batch)", True)]  # fmt: skip
    by_iter, by_time, marks = [], [], []
    for pb in records["batches"]:
        rows = {r["method"]: r for r in pb["rows"] if "error" not in r}
        for name in ("sequential forward (eager)", "sequential forward (CUDA graph)"):
            if name in rows:
                marks.append((_seconds(rows[name]) * 1e3, f"B={pb['batch']} {name}"))
        for sweep, tr in pb["traces"].items():
            it = [r["iter"] for r in tr["per_iter"]]
            series = {k: [r[k] for r in tr["per_iter"]] for k, _, _ in panels}
            label = f"B={pb['batch']} {sweep}"
            by_iter.append({"label": label, "x": it, **series})
            exact = rows.get(f"jacobi {sweep} sweep, exact")
            if exact and _seconds(exact) and _iters(exact):
                per = _seconds(exact) / _iters(exact)  # measured seconds per iteration
                by_time.append({"label": label, "x": [i * per * 1e3 for i in it], **series})
    if not by_iter:
        return []
    paths = [plot_curves(panels, by_iter, out_dir / "convergence_iter.png", "iteration", title)]
    if by_time:
        paths.append(
            plot_curves(panels, by_time, out_dir / "convergence_time.png",
                        "ms (iteration x measured time per exact-run iteration)", title, marks)
        )  # fmt: skip
    return paths


#: the paper's DenseNet-201 numbers: a SIMULATED parallel time (slowest layer x iterations)
PAPER = {"sequential_s": 0.0279, "jacobi_s": 0.0131, "speedup": 2.13}


def paper(records: dict[str, Any], key: str) -> list[str]:
    """Per batch: the strongest sequential forward against the fastest measured Jacobi, and
    the paper's estimate computed on our own timings."""
    rows = []
    for pb in records["batches"]:
        measured = [r for r in pb["rows"] if _seconds(r) and not r.get("estimate")]
        seq = [r for r in measured if r["method"].startswith("sequential")]
        online = [
            r for r in measured if r["method"].startswith("jacobi") and "fixed" not in r["method"]
        ]
        estimates = [r for r in pb["rows"] if r.get("estimate") and "atol" in r["method"]]
        if not seq or not online:
            continue
        s = min(seq, key=_seconds)
        j = min(online, key=_seconds)
        p = f"{PAPER['sequential_s']} s vs {PAPER['jacobi_s']} s: {PAPER['speedup']}x, simulated"
        text = (
            f"{s['method']} {_seconds(s) * 1e3:.3g} ms; fastest measured Jacobi "
            f"({j['method']}, {_iters(j)} sweeps) {_seconds(j) * 1e3:.3g} ms: "
            f"**{_seconds(s) / _seconds(j):.2f}x**"
        )
        if estimates:
            e = min(estimates, key=_seconds)
            text += f"; the paper's ESTIMATE on these timings {_seconds(s) / _seconds(e):.2f}x"
        paper_cell = p if pb["batch"] == 1 and key == "densenet-201" else ""
        rows.append(f"| {key} | batch {pb['batch']} | {paper_cell} | {text} |")
    return rows


register_experiment(
    Experiment(
        name="densenet-jacobi",
        description="DenseNet by Jacobi over its dense layers: real timings, per-layer and fused",
        config=DenseNetJacobiConfig,
        run=run,
        plot=plot,
        summary=summary,
        paper=paper,
        steps=(
            Step(
                "densenet-bc",
                config="configs/densenet_jacobi.yaml",
                data="fashion-mnist",
                checkpoint="checkpoints/densenet_bc_fmnist",
            ),
            Step(
                "densenet-201",
                ("checkpoint=null", "arch=densenet201", "batches=[1, 16]", "repeats=3"),
                config="configs/densenet_jacobi.yaml",
            ),
        ),  # fmt: skip
        bench=(
            Case(
                "densenet",
                (
                    "checkpoint=checkpoints/densenet_bc_fmnist",
                    "inputs=noise",
                    "image_size=28",
                    "sweeps=[fused-unfold]",
                    "trace=false",
                    "repeats=7",
                    "warmup=2",
                ),
                default=False,
            ),
        ),  # fmt: skip
    )
)
