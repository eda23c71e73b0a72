"""`ffsolve run densenet-jacobi`: the paper's DenseNet experiment, timed for real.

For each batch size: the sequential forward (eager, and replayed from a CUDA graph on CUDA),
Jacobi over the dense layers with online stopping (exact, atol = 0, and with a tolerance),
each with the per-layer sweep and the fused sweeps (one batched GEMM for the bottlenecks and
one grouped conv, or im2col + one batched GEMM, for the 3x3 convs of a block), Jacobi as one
static device step replayed from a CUDA graph with online stopping, the fixed number of
sweeps the tolerance needed captured in a CUDA graph, and beside them the
paper's simulated number, labelled an estimate: the slowest single dense layer's time times
the iteration count. Untimed traced runs give, per iteration, the top-5 agreement with the
sequential prediction (the five largest logits), the logit l2 error, the forward difference
and the first iteration from which the predicted class no longer changes.

With `arch: densenet201` the weights are random (no ImageNet weights here): its timings are
real, its convergence curve says nothing about a trained network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ffsolve.bench import time_call
from ffsolve.config import Config, spec
from ffsolve.data import load_images
from ffsolve.experiments import Experiment, RunContext, register_experiment
from ffsolve.models.densenet import DenseNet, densenet_config, load_densenet
from ffsolve.plots import plot_curves
from ffsolve.problems.layered import DenseNetLayers, prediction_metrics, stable_from
from ffsolve.solvers import get_solver


@dataclass(frozen=True)
class DenseNetJacobiConfig(Config):
    checkpoint: str | None = None  # a trained DenseNet (ffsolve train densenet)
    arch: str | None = spec(None, choices=("densenet121", "densenet169", "densenet201"))
    image_size: int = spec(224, ge=32)  # for `arch` (random images, random weights; /32 inside)
    data_dir: str | None = None  # test images of the checkpoint's data set
    batches: tuple[int, ...] = spec((1, 64), ge=1)
    dtype: str = spec("float32", choices=("float32", "float64"))
    atol: float = spec(1e-3, ge=0)  # the tolerance rows (the exact rows use 0)
    check_every: int = spec(1, ge=1)
    # layer: per-layer loop; fused: one GEMM + one grouped conv per block; fused-unfold: the
    # 3x3 convs as im2col + one batched GEMM instead
    sweeps: tuple[str, ...] = spec(
        ("layer", "fused", "fused-unfold"), choices=("layer", "fused", "fused-unfold")
    )
    cuda_graph: bool = True  # graph rows on CUDA
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
        raise ValueError("give exactly one of checkpoint= (trained) or arch= (random weights)")
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
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    return model.to(device=ctx.device, dtype=dtype).eval(), info


def _images(cfg: DenseNetJacobiConfig, model: DenseNet, info: dict, n: int) -> torch.Tensor:
    """(n, C, H, W) inputs: the first n test images of the checkpoint's data, else seeded
    Gaussian noise images at image_size (for random-weight models)."""
    data = info.get("data")
    if cfg.checkpoint is not None and data:
        x = load_images(data["name"], cfg.data_dir)["test"][0][:n]
        x = torch.from_numpy(np.array(x)).float().div(255.0).unsqueeze(1)
        x = (x - data["mean"]) / data["std"]
        if len(x) < n:
            x = x.repeat(-(-n // len(x)), 1, 1, 1)[:n]
        return x
    g = torch.Generator().manual_seed(cfg.seed)
    s = cfg.image_size
    return torch.randn(n, model.config.in_channels, s, s, generator=g)


def capture_graph(fn, device: torch.device):
    """Capture fn() (static shapes, no host reads) in a CUDA graph; returns (replay, output)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _fixed_sweeps(problem: DenseNetLayers, images: torch.Tensor, n: int) -> torch.Tensor:
    """Stem, n full Jacobi sweeps from zero, head: the solve with a known iteration count,
    with no host read (so it can be captured)."""
    problem.stem_out = problem.model.stem(images)
    x = problem.initial()
    for _ in range(n):
        x = problem.evaluate(x, 0, problem.length)
    return problem.logits(x)


class StaticJacobi:
    """Jacobi over the layers as one device step on static buffers, replayed from a CUDA graph
    (or called eagerly on the CPU), with the host reading a done-flag every `check_every`
    sweeps: online stopping without the solver loop's per-sweep bookkeeping.

    The flag is "the whole sweep changed nothing beyond atol", so with atol = 0 it stops one
    sweep after the solver's certificate would (the certificate also trusts the first changed
    position); the iteration count says so.
    """

    def __init__(self, problem: DenseNetLayers, atol: float, capture: bool) -> None:
        self.problem = problem
        self.state = problem.initial().clone()  # (B, T, F) static iterate
        self.flag = torch.zeros((), dtype=torch.bool, device=self.state.device)
        self.atol = atol
        self.replay = self._step
        if capture:
            self.replay, _ = capture_graph(self._step, self.state.device)

    def _step(self) -> None:
        new = self.problem.evaluate(self.state, 0, self.problem.length)
        self.flag.copy_((new - self.state).abs().amax() <= self.atol)
        self.state.copy_(new)

    def __call__(self, images: Tensor, check_every: int = 1) -> tuple[Tensor, int]:
        """Stem (eager), sweeps until the flag is set (at most T + 1), head; (logits, sweeps)."""
        p = self.problem
        p.stem_out.copy_(p.model.stem(images))  # the captured sweeps read this buffer
        self.state.zero_()
        k = 0
        while k < p.length + 1:
            self.replay()
            k += 1
            if k % check_every == 0 and bool(self.flag):
                break
        return p.logits(self.state), k


def _trace(problem: DenseNetLayers, ref: torch.Tensor, atol: float) -> dict[str, Any]:
    """An untimed solve to exactness, with per-iteration prediction metrics."""
    rows: list[dict[str, Any]] = []
    prev = [None]

    def callback(k: int, x: torch.Tensor) -> None:
        logits = problem.logits(x)
        rows.append({"iter": k, **prediction_metrics(logits, ref, prev[0])})
        prev[0] = logits

    sol = get_solver("jacobi").solve(problem, record=True, callback=callback)
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


def _row(label: str, seconds: float | None, iters: Any, ref_s: float, **extra: Any) -> dict:
    return {
        "method": label,
        "seconds": seconds,
        "iters": iters,
        "speedup": (ref_s / seconds) if seconds else None,
        **extra,
    }


def run(cfg: DenseNetJacobiConfig, ctx: RunContext) -> dict[str, Any]:
    device = ctx.device
    if device.type == "cuda":  # equality is checked: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model, info = _model(cfg, ctx)
    dtype = next(model.parameters()).dtype
    ctx.log(f"model {info['name']}: {info['num_layers']} dense layers, weights {info['weights']}")
    per_batch = []
    for B in cfg.batches:
        images = _images(cfg, model, info, B).to(device=device, dtype=dtype)
        with torch.no_grad():
            t_seq, _, ref = time_call(lambda images=images: model(images), device,
                                      cfg.warmup, cfg.repeats)  # fmt: skip
            rows = [_row("sequential forward (eager)", t_seq, model.num_layers, t_seq)]
            if device.type == "cuda" and cfg.cuda_graph:
                try:
                    replay, out = capture_graph(lambda images=images: model(images), device)
                    t, _, _ = time_call(replay, device, cfg.warmup, cfg.repeats)
                    diff = float((out - ref).abs().max())
                    rows.append(_row("sequential forward (CUDA graph)", t, model.num_layers,
                                     t_seq, max_abs_diff=diff))  # fmt: skip
                except RuntimeError as e:  # log and go on with the eager rows
                    ctx.log(f"  CUDA graph of the forward failed: {e}")
            traces, slowest = {}, None
            for sweep in cfg.sweeps:
                problem = DenseNetLayers(model, images, **sweep_options(sweep))
                traces[sweep] = _trace(problem, ref, cfg.atol)
                timed = DenseNetLayers(
                    model, images, **sweep_options(sweep)
                )  # BN folded once, untimed
                for atol in (0.0, cfg.atol):

                    def solve(atol=atol, p=timed, images=images):
                        p.stem_out = model.stem(images)  # the stem is part of the forward
                        s = get_solver("jacobi").solve(
                            p, atol=atol, record=False, check_every=cfg.check_every
                        )
                        return p.logits(s.value), s.num_iters

                    t, _, (logits, iters) = time_call(solve, device, cfg.warmup, cfg.repeats)
                    name = "exact" if atol == 0 else f"atol={atol:g}"
                    top = prediction_metrics(logits, ref, None)
                    rows.append(
                        _row(f"jacobi {sweep} sweep, {name}", t, iters, t_seq,
                             max_abs_diff=float((logits - ref).abs().max()),
                             top5_agree=top["top5_agree"], top1_agree=top["top1_agree"])
                    )  # fmt: skip
                if device.type == "cuda" and cfg.cuda_graph:
                    rows += _graph_rows(model, images, ref, sweep, traces[sweep], cfg, t_seq, ctx)
            # the paper's simulation: the slowest dense layer alone, times the iterations
            slowest = _slowest_layer(model, images, device, cfg)
            for sweep, tr in traces.items():
                for what, n in (("top-5 stable", tr["top5_stable_from"]),
                                (f"atol={cfg.atol:g}", tr["tolerance_iter"])):  # fmt: skip
                    rows.append(
                        _row(f"ESTIMATE slowest layer x {n} ({what}, "
                             f"{sweep} trace)", slowest * n, n, t_seq, estimate=True)
                    )  # fmt: skip
        # the strongest sequential baseline measured here (eager or CUDA graph)
        best = min(r["seconds"] for r in rows if r["method"].startswith("sequential"))
        for r in rows:
            r["speedup_vs_best_sequential"] = best / r["seconds"] if r["seconds"] else None
        for r in rows:
            ctx.log(f"  B={B:<4} {r['method']:<62} {_fmt_s(r['seconds'])}  iters={r['iters']}")
        per_batch.append({"batch": B, "rows": rows, "traces": traces, "slowest_layer_s": slowest})
    return {"model": info, "batches": per_batch}


def _graph_rows(model, images, ref, sweep, trace, cfg, t_seq, ctx) -> list[dict[str, Any]]:
    """CUDA-graph rows of one sweep kind: online stopping (exact and atol), and the fixed
    number of sweeps the atol trace needed (no flag read at all)."""
    rows = []
    try:
        for atol in (0.0, cfg.atol):
            solver = StaticJacobi(
                DenseNetLayers(model, images, **sweep_options(sweep)), atol, capture=True
            )
            t, _, (logits, n) = time_call(lambda s=solver: s(images, cfg.check_every),
                                          images.device, cfg.warmup, cfg.repeats)  # fmt: skip
            name = "exact" if atol == 0 else f"atol={atol:g}"
            rows.append(
                _row(f"jacobi {sweep} sweep, {name} (CUDA graph, online)", t, n, t_seq,
                     max_abs_diff=float((logits - ref).abs().max()),
                     note="stops when a whole sweep changes nothing beyond atol")
            )  # fmt: skip
            del solver
        n = trace["tolerance_iter"]
        p = DenseNetLayers(model, images, **sweep_options(sweep))
        replay, out = capture_graph(
            lambda p=p, n=n, im=images: _fixed_sweeps(p, im, n), images.device
        )
        t, _, _ = time_call(replay, images.device, cfg.warmup, cfg.repeats)
        rows.append(
            _row(f"jacobi {sweep} sweep, {n} sweeps (CUDA graph, fixed)", t, n, t_seq,
                 max_abs_diff=float((out - ref).abs().max()),
                 note="fixed count = the atol trace's iterations, no online stop")
        )  # fmt: skip
    except RuntimeError as e:  # capture can fail on some kernels: log, go on
        ctx.log(f"  CUDA graph of the {sweep} sweep failed: {e}")
    return rows


def _slowest_layer(model: DenseNet, images: torch.Tensor, device, cfg) -> float:
    """Median time of each dense layer alone on its real input; the maximum."""
    feats = model.stem(images)
    worst = 0.0
    for b, block in enumerate(model.dense_blocks()):
        cat = feats
        for layer in block.values():
            t, _, new = time_call(lambda layer=layer, cat=cat: layer(cat), device,
                                  cfg.warmup, cfg.repeats)  # fmt: skip
            worst = max(worst, t)
            cat = torch.cat([cat, new], 1)
        if b < len(model.transitions()):
            feats = model.transitions()[b](cat)
    return worst


def _fmt_s(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:9.3f} ms"


def summary(records: dict[str, Any]) -> str:
    m = records["model"]
    lines = [f"{m['name']} ({m['num_layers']} dense layers, weights {m['weights']})"]
    head = (
        f"{'batch':>5}  {'method':<66} {'ms':>10} {'iters':>6} {'vs eager':>9} {'vs best':>8} "
        f"{'max|diff|':>9}"
    )
    lines += [head, "-" * len(head)]
    for pb in records["batches"]:
        for r in pb["rows"]:
            sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
            vb = r.get("speedup_vs_best_sequential")
            vb = f"{vb:.2f}x" if vb else ""
            d = r.get("max_abs_diff")
            lines.append(
                f"{pb['batch']:>5}  {r['method']:<66} {r['seconds'] * 1e3:>10.3f} "
                f"{r['iters']!s:>6} {sp:>9} {vb:>8} {'' if d is None else f'{d:.1e}':>9}"
            )
        for sweep, tr in pb["traces"].items():
            lines.append(
                f"{pb['batch']:>5}  {sweep} trace: prediction stable from iteration "
                f"{tr['prediction_stable_from']}, top-5 from {tr['top5_stable_from']}, "
                f"forward difference <= atol at {tr['tolerance_iter']}, exact at "
                f"{tr['num_iters']}"
            )
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    m = records["model"]
    title = f"{m['name']}, weights {m['weights']}: Jacobi over {m['num_layers']} dense layers"
    panels = [("top5_agree", "top-5 agreement with sequential", False),
              ("logit_l2", "logit l2 error (mean over batch)", True)]  # fmt: skip
    by_iter, by_time, marks = [], [], []
    for pb in records["batches"]:
        rows = {r["method"]: r for r in pb["rows"]}
        for name in ("sequential forward (eager)", "sequential forward (CUDA graph)"):
            if name in rows:
                marks.append((rows[name]["seconds"] * 1e3, f"B={pb['batch']} {name}"))
        for sweep, tr in pb["traces"].items():
            it = [r["iter"] for r in tr["per_iter"]]
            series = {k: [r[k] for r in tr["per_iter"]] for k, _, _ in panels}
            label = f"B={pb['batch']} {sweep}"
            by_iter.append({"label": label, "x": it, **series})
            exact = rows.get(f"jacobi {sweep} sweep, exact")
            if exact and exact["seconds"] and exact["iters"]:
                per = exact["seconds"] / exact["iters"]  # measured seconds per iteration
                by_time.append({"label": label, "x": [i * per * 1e3 for i in it], **series})
    paths = [plot_curves(panels, by_iter, out_dir / "convergence_iter.png", "iteration", title)]
    if by_time:
        paths.append(
            plot_curves(panels, by_time, out_dir / "convergence_time.png",
                        "ms (iteration x measured time per exact-run iteration)", title, marks)
        )  # fmt: skip
    return paths


register_experiment(
    Experiment(
        name="densenet-jacobi",
        description="DenseNet by Jacobi over its dense layers: real timings, per-layer and fused",
        config=DenseNetJacobiConfig,
        run=run,
        plot=plot,
        summary=summary,
    )
)
