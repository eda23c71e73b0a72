"""`ffsolve run rnn-step`: one backward and one whole training step of a vanilla RNN on one
long sequence, by autograd's BPTT and by ffsolve's methods, across sequence lengths.

Model: `VanillaRNN` (softplus, hidden `hidden`), batch 1, next-value regression of a random
sequence in [0, 1) of length T + 1. For each T every variant is timed side by side in one
process (`timed_rows`): the backward alone (gradients of a loss already computed) and a
training step (forward, backward and the update's kernels, with the weights kept so every
repeat is the same step). The reference is autograd through the plain loop; every row
records its relative gradient error against it.

Variants: Jacobi with a fixed budget (one host read, after the last sweep), Jacobi to a
relative tolerance, Jacobi with autograd sweeps instead of the closed-form VJP, the scan, a
parallel forward (Jacobi to atol 1e-5) with each of those backwards, and on CUDA the Jacobi
loop captured anew at each backward and the scan's whole backward replayed from a graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ffsolve.backprop import backprop_through
from ffsolve.bench import Outcome, Row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.experiments import Case, Experiment, RunContext, register_experiment
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.plots import plt, save_figure
from ffsolve.runtime import dtype_of, exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, Stopping


@dataclass(frozen=True)
class RNNStepConfig(Config):
    """Attributes:
    lengths: sequence lengths T.
    hidden: the RNN's hidden size.
    budget: the fixed Jacobi budget (at most T).
    repeats, warmup: timing (median of repeats after warm-up calls).
    """

    lengths: tuple[int, ...] = spec((100, 1000, 10000), ge=2)
    hidden: int = spec(128, ge=1)
    budget: int = spec(24, ge=1)
    dtype: str = spec("float32", choices=("float32", "float64"))
    repeats: int = spec(7, ge=1)
    warmup: int = spec(2, ge=0)
    seed: int = spec(0, ge=0)


def _variants(cfg: RNNStepConfig, T: int, cuda: bool) -> list[tuple[str, str | None, dict]]:
    """(label, backward method or None for autograd, backprop_through options)."""
    k = cfg.budget
    fixed = {"max_iters": min(k, T), "check_every": min(k, T)}  # one host read, at the end
    # a parallel forward too, so the whole step is parallel. atol 1e-5: at 1e-6 float32
    # rounding keeps this wide state moving (1,357 sweeps at T = 3,000 on a CPU, 6,935 at
    # 10,000); at 1e-5 the forward takes 25 sweeps at any T, gradient error about 3e-6
    pfwd = {"forward_method": "jacobi", "forward": Stopping(atol=1e-5, check_every=8)}
    out: list[tuple[str, str | None, dict]] = [
        ("autograd BPTT", None, {}),
        (f"jacobi budget {k}", "jacobi", fixed),
        ("jacobi rtol=1e-6", "jacobi", {"rtol": 1e-6, "check_every": 8}),
        (f"jacobi budget {k} autograd sweeps", "jacobi", {**fixed, "fast_vjp": False}),
        ("scan", "scan", {}),
        (f"jacobi forward atol 1e-5 + jacobi budget {k}", "jacobi", {**fixed, **pfwd}),
        ("jacobi forward atol 1e-5 + scan", "scan", pfwd),
    ]
    if cuda:  # captured anew at each backward: shows what that costs
        out.append((f"jacobi budget {k} captured", "jacobi", {**fixed, "capture": True}))
        # the whole scan backward replayed from one graph cached per shape
        out.append(("scan captured backward", "scan", {"capture": True}))
    return out


def _length(cfg: RNNStepConfig, ctx: RunContext, T: int) -> list[dict[str, Any]]:
    dtype = dtype_of(cfg.dtype)
    rnn = VanillaRNN(VanillaRNNConfig(hidden=cfg.hidden, seed=cfg.seed))
    rnn = rnn.to(device=ctx.device, dtype=dtype)
    params = [rnn.W_h, rnn.W_x, rnn.b_h, rnn.W_o, rnn.b_o]
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(1, T + 1, 1, generator=g).to(ctx.device, dtype)  # (1, T + 1, 1)
    inp, target = x[:, :-1], x[:, 1:]  # next-value prediction, as in the paper's experiment

    def loss_of(method: str | None, kw: dict[str, Any]) -> torch.Tensor:
        if method is None:  # autograd through the plain loop
            _, hs = rnn(inp)
        else:
            hs, _ = backprop_through(
                rnn.step, rnn.initial_state(1), inp, method, params=params[:3], **kw
            )
        return F.mse_loss(rnn.readout(hs), target)

    def flat(grads) -> torch.Tensor:
        return torch.cat([gr.reshape(-1) for gr in grads])

    backward_rows, step_rows = [], []
    for label, method, kw in _variants(cfg, T, ctx.device.type == "cuda"):
        kind = "sequential" if method is None else method
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                loss = loss_of(method, kw)
        except Exception as e:  # a variant that cannot run here is recorded, not fatal
            backward_rows.append(Row(label, kind, _raiser(e)))
            step_rows.append(Row(label, kind, _raiser(e)))
            continue

        def backward(loss=loss) -> Outcome:
            with warnings.catch_warnings():  # a fixed budget stops early on purpose
                warnings.simplefilter("ignore", ConvergenceWarning)
                return Outcome(flat(torch.autograd.grad(loss, params, retain_graph=True)), 1)

        def train_step(method=method, kw=kw) -> Outcome:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                grads = torch.autograd.grad(loss_of(method, kw), params)
            with torch.no_grad():
                for p, gr in zip(params, grads, strict=True):
                    p.sub_(gr, alpha=0.0)  # the update's kernels, weights kept
            return Outcome(flat(grads), 1)

        backward_rows.append(Row(label, kind, backward))
        step_rows.append(Row(label, kind, train_step))
    common = dict(
        warmup=cfg.warmup, grad=True, log=ctx.log, keep=ctx.keep, reference="autograd BPTT"
    )
    ctx.log("  backward:")
    back, outs = timed_rows(backward_rows, ctx.device, repeats=cfg.repeats, **common)
    ctx.log("  training step:")
    step, _ = timed_rows(step_rows, ctx.device, repeats=max(1, cfg.repeats // 2), **common)
    ref = outs.get("autograd BPTT")
    rows = []
    for b, s in zip(back, step, strict=True):
        row: dict[str, Any] = {"method": b["method"], "solver": b["solver"]}
        if "error" in b or "error" in s:
            row["error"] = b.get("error") or s.get("error")
            rows.append(row)
            continue
        row.update(backward=b, train_step=s)
        row["backward_speedup"] = b.get("speedup_vs_sequential")
        row["train_speedup"] = s.get("speedup_vs_sequential")
        if ref is not None:
            got = outs[b["method"]].value.double()
            want = ref.value.double()
            row["relative_grad_error"] = float((got - want).norm() / want.norm().clamp_min(1e-300))
        rows.append(row)
    return rows


def _raiser(e: Exception):
    def call() -> Outcome:
        raise e

    return call


def run(cfg: RNNStepConfig, ctx: RunContext) -> dict[str, Any]:
    exact_arithmetic(ctx.device)
    out = []
    for T in cfg.lengths:
        ctx.log(f" T = {T}")
        out.append({"length": T, "rows": _length(cfg, ctx, T)})
    return {"hidden": cfg.hidden, "batch": 1, "lengths": out}


def summary(records: dict[str, Any]) -> str:
    lines = []
    for entry in records["lengths"]:
        lines.append(f"T = {entry['length']}:")
        for r in entry["rows"]:
            if "error" in r:
                lines.append(f"  {r['method']:<48} FAILED: {r['error'][:70]}")
                continue
            err = r.get("relative_grad_error")
            lines.append(
                f"  {r['method']:<48} backward {r['backward']['wall_time_s'] * 1e3:9.3f} ms "
                f"({r['backward_speedup']:.2f}x)  step {r['train_step']['wall_time_s'] * 1e3:9.3f} "
                f"ms ({r['train_speedup']:.2f}x)  rel. grad error "
                f"{'-' if err is None else f'{err:.1e}'}"
            )
    lines.append("speed-ups against autograd's BPTT through the plain loop, same process")
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    lengths = records.get("lengths") or []
    pts: dict[str, list[tuple[int, float]]] = {}
    for e in lengths:
        for r in e["rows"]:
            if r.get("backward_speedup") and r["method"] != "autograd BPTT":
                pts.setdefault(r["method"], []).append((e["length"], r["backward_speedup"]))
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, p in sorted(pts.items()):
        ax.loglog(*zip(*p, strict=True), "o-", label=m)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("backward speed-up vs autograd BPTT")
    ax.set_title(records.get("env", {}).get("device_name", ""))
    ax.legend(fontsize=7)
    return [save_figure(fig, out_dir / "rnn_speedup.png")]


register_experiment(
    Experiment(
        name="rnn-step",
        description="one backward and one training step of a vanilla RNN at long T vs autograd",
        config=RNNStepConfig,
        run=run,
        plot=plot,
        summary=summary,
        bench=(Case("rnn-backprop"),),
    )
)
