"""The forward pass of an RNN by every method, against cuDNN: h_t = cell(h_{t-1}, x_t).

For each cell (GRU, LSTM), hidden size, length T and batch B, one random cell (torch's
default initialisation, recurrent weights scaled by `weight_scale`, seeded) and random
inputs x ~ N(0, 1) give one `RecurrenceForward` problem; every method computes h_1..h_T:

- `cudnn`: `nn.GRU` / `nn.LSTM` with the same weights, on CUDA only (on a CPU the row is
  recorded as skipped: ATen's CPU kernel is no cuDNN). A refusal (cuDNN declines very long
  sequences) is caught and recorded.
- `sequential`: the plain loop of the cell (ffsolve's `sequential`), timed up to
  `loop_max_length`; longer sequences use it once, untimed, as the reference.
- `sequential_graph`: the same loop captured in one CUDA graph (`capture=True`: T cell
  calls replayed without launch overhead from Python), CUDA only, up to `loop_max_length`.
- `jacobi`, `newton`, `quasi_newton`: stopped online at max-abs change <= `atol`.

Per row: median time (`ffsolve.bench.timed_rows`), iterations, peak device memory (CUDA
only), and the max-abs difference from the sequential states (h only, also for the LSTM,
since cuDNN returns no c). Random weights: untrained cells mix fast, so iteration counts here say
how a method scales, not what a trained model needs.

With `checkpoint` (a "gru-char" model of `ffsolve train gru`) the cell is the trained GRU
(`nn.GRUCell` with its weights; `nn.GRU` with the same weights for cuDNN), the hidden size
and input size are the checkpoint's, and the inputs are one-hot characters of the held-out
text kept in the checkpoint: batch item b reads it from offset b * N / B (N its length),
repeating it when T > N. Every row records `weights`: "trained" or "random".
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffsolve.bench import Outcome, Row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.errors import ConfigError
from ffsolve.experiments import Case, Experiment, RunContext, register_experiment
from ffsolve.models.char_gru import load_char_gru
from ffsolve.plots import plt, save_figure
from ffsolve.problems import RecurrenceForward
from ffsolve.runtime import dtype_of, exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, Stopping, get_solver

__all__ = ["RNNForwardConfig", "plot", "run", "summary", "winners", "winners_table"]

_METHODS = ("cudnn", "sequential", "sequential_graph", "jacobi", "newton", "quasi_newton")
_PARALLEL = ("jacobi", "newton", "quasi_newton")
_AUTO = "auto"  # method="auto" among the parallel methods listed (not run by default)
_BASELINES = ("cudnn", "sequential", "sequential_graph")  # the sequential rows


@dataclass(frozen=True)
class RNNForwardConfig(Config):
    """Shapes, methods and budgets of the rnn-forward comparison.

    Attributes:
        cells: "gru" and/or "lstm".
        hidden, lengths, batches: the grid of hidden sizes, sequence lengths T and batches.
        input_size: features of x_t.
        methods: rows to run (see the module doc); auto: method="auto" choosing between the
            plain loop and the parallel methods listed.
        atol: stopping tolerance of the parallel methods (max-abs change of an iterate).
        weight_scale: factor on the recurrent weights (> 1: slower mixing, more iterations).
        loop_max_length: longest T at which the sequential loop is timed.
        newton_max_entries: largest B*T*F^2 (Jacobian entries per iteration, F the flat
            state: 2H for an LSTM) for dense `newton`; larger rows are recorded as skipped.
        time_budget_s: no new shape is started after this many seconds (0: no limit); the
            shapes not run are recorded as skipped. Shapes run by increasing T.
        max_iters: iteration cap of the parallel methods (0: T, the exactness bound).
        repeats, warmup: timing (median of repeats after warmup calls).
        dtype: float32 or float64.
        seed: weights and inputs.
        checkpoint: a "gru-char" checkpoint (`ffsolve train gru`): the trained GRU on held-out
            text replaces the random cells (cells must be ["gru"]; hidden and input_size
            must be left at their defaults or equal the checkpoint's; weight_scale 1).
            None: random weights.
    """

    cells: tuple[str, ...] = spec(("gru", "lstm"), choices=("gru", "lstm"))
    hidden: tuple[int, ...] = spec((4, 64, 256), ge=1)
    lengths: tuple[int, ...] = spec((1000, 10000, 100000), ge=1)
    batches: tuple[int, ...] = spec((16,), ge=1)
    input_size: int = spec(2, ge=1)
    methods: tuple[str, ...] = spec(_METHODS, choices=(*_METHODS, _AUTO))
    atol: float = spec(1e-6, ge=0.0)
    weight_scale: float = spec(1.0, gt=0.0)
    loop_max_length: int = spec(10000, ge=1)
    newton_max_entries: int = spec(2**31, ge=1)
    time_budget_s: float = spec(0.0, ge=0.0)
    max_iters: int = spec(0, ge=0)
    repeats: int = spec(3, ge=1)
    warmup: int = spec(1, ge=0)
    dtype: str = spec("float32", choices=("float32", "float64"))
    seed: int = spec(0, ge=0)
    checkpoint: str | None = None


def _build(kind: str, D: int, H: int, scale: float, seed: int, device, dtype):
    """A torch cell and the cuDNN module with the same weights."""
    with torch.random.fork_rng(devices=[]):  # torch's default init, seeded, global RNG untouched
        torch.manual_seed(seed)
        cell = (nn.GRUCell if kind == "gru" else nn.LSTMCell)(D, H)
        rnn = (nn.GRU if kind == "gru" else nn.LSTM)(D, H, batch_first=True)
    with torch.no_grad():
        cell.weight_hh.mul_(scale)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, f"{name}_l0").copy_(getattr(cell, name))
    cell = cell.to(device=device, dtype=dtype).requires_grad_(False)
    rnn = rnn.to(device=device, dtype=dtype).requires_grad_(False)
    return cell, rnn


class _Trained:
    """A loaded "gru-char" model and its held-out text, shared by every shape of a run."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype) -> None:
        model, self.heldout, self.meta = load_char_gru(path, "cpu")
        self.model = model.to(dtype=dtype)
        self.hidden, self.vocab = model.config.hidden, model.config.vocab
        self.device, self.dtype = device, dtype

    def build(self):
        """(nn.GRUCell, nn.GRU) with the trained weights, on the run's device and dtype."""
        cell = self.model.cell().to(device=self.device).requires_grad_(False)
        rnn = self.model.gru.to(device=self.device).requires_grad_(False)
        return cell, rnn

    def inputs(self, B: int, T: int) -> torch.Tensor:
        """(B, T, vocab) one-hot held-out characters; item b starts at b * N // B, wrapping."""
        N = len(self.heldout)
        idx = (torch.arange(B)[:, None] * (N // B) + torch.arange(T)[None]) % N  # (B, T)
        return self.model.one_hot(self.heldout[idx]).to(device=self.device)


def _trained(cfg: RNNForwardConfig, device: torch.device) -> _Trained | None:
    """The trained model of `cfg.checkpoint`, checked against the rest of the config."""
    if cfg.checkpoint is None:
        return None
    if tuple(cfg.cells) != ("gru",):
        raise ConfigError("checkpoint holds a GRU: set cells=[gru]")
    if cfg.weight_scale != 1.0:
        raise ConfigError("weight_scale applies to random weights only: leave it 1 with checkpoint")
    trained = _Trained(cfg.checkpoint, device, dtype_of(cfg.dtype))
    default = RNNForwardConfig()
    if tuple(cfg.hidden) not in (default.hidden, (trained.hidden,)):
        raise ConfigError(f"hidden comes from the checkpoint ({trained.hidden}): leave it unset")
    if cfg.input_size not in (default.input_size, trained.vocab):
        raise ConfigError(f"input_size comes from the checkpoint ({trained.vocab}): leave it unset")
    return trained


def _shape_rows(cfg, kind, H, T, B, ctx, trained: _Trained | None = None) -> list[dict[str, Any]]:
    """Every method on one shape, timed side by side by `timed_rows`; the reference is the
    sequential loop's h (timed too up to `loop_max_length`, else computed untimed)."""
    device, dtype = ctx.device, dtype_of(cfg.dtype)
    if trained is None:
        seed = cfg.seed + 1000 * H + T + 7 * B
        cell, rnn = _build(kind, cfg.input_size, H, cfg.weight_scale, seed, device, dtype)
        g = torch.Generator(device="cpu").manual_seed(seed)
        xs = torch.randn(B, T, cfg.input_size, generator=g).to(device=device, dtype=dtype)
    else:
        cell, rnn = trained.build()
        xs = trained.inputs(B, T)  # (B, T, vocab) one-hot held-out text
    h0 = torch.zeros(B, H, device=device, dtype=dtype)
    h0s = h0 if kind == "gru" else (h0, h0.clone())
    problem = RecurrenceForward(cell, h0s, xs)
    weights = "random" if trained is None else "trained"
    base = {"cell": kind, "hidden": H, "length": T, "batch": B, "weights": weights}
    out: list[dict[str, Any]] = []
    rows: list[Row] = []

    def solve_row(label: str, method: str, stop: Stopping, **opts) -> Row:
        solver = get_solver(method, **opts)

        def call() -> Outcome:
            sol = solver.solve(problem, stop)
            extra = {"converged": sol.all_converged}
            for k in ("newton_fallbacks", "newton_nonfinite"):
                if k in sol.stats:
                    extra[k] = int(sum(sol.stats[k]))
            if "auto" in sol.stats:
                extra["auto_choice"] = sol.stats["auto"]["choice"]
            return Outcome(sol.value[..., :H], sol.num_iters, extra)  # h of an LSTM's [h, c]

        return Row(label, "sequential" if method == "sequential" else method, call)

    loop_ok = not cfg.loop_max_length < T
    for method in cfg.methods:
        row = {**base, "method": method}
        if method == "cudnn":
            if device.type != "cuda":  # ATen's CPU loop is not cuDNN: no row pretends it is
                out.append({**row, "skipped": f"no cuDNN on {device.type}"})
                continue
            hx = h0[None] if kind == "gru" else (h0[None], h0[None].clone())
            rows.append(Row("cudnn", "sequential", lambda hx=hx: Outcome(rnn(xs, hx)[0], T)))
        elif method in ("sequential", "sequential_graph"):
            if method == "sequential_graph" and device.type != "cuda":
                out.append({**row, "skipped": f"no CUDA graph on {device.type}"})
            elif not loop_ok:  # the untimed reference only (no row for the plain loop)
                if method == "sequential_graph":
                    out.append({**row, "skipped": f"T > loop_max_length ({cfg.loop_max_length})"})
            else:
                capture = method == "sequential_graph"
                rows.append(
                    solve_row(method, "sequential", Stopping(record=False, capture=capture))
                )
        else:
            entries = B * T * problem.shape[2] ** 2
            too_big = entries > cfg.newton_max_entries
            if method == "newton" and too_big:
                out.append({**row, "skipped": f"B*T*F^2 = {entries:.1e} > newton_max_entries"})
                continue
            stop = Stopping(atol=cfg.atol, record=False, max_iters=cfg.max_iters or None)
            if method == _AUTO:  # the plain loop against the parallel methods listed
                among = [
                    m for m in cfg.methods if m in _PARALLEL and not (m == "newton" and too_big)
                ]
                rows.append(solve_row(method, method, stop, methods=among or None))
                continue
            rows.append(solve_row(method, method, stop))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as `converged`
        ref = get_solver("sequential").solve(problem, record=False).value[..., :H]  # untimed
        _reset_peak(device)
        records, _ = timed_rows(
            rows, device, warmup=cfg.warmup, repeats=cfg.repeats, reference_value=ref,
            baselines=[r.label for r in rows if r.kind == "sequential"], log=ctx.log, keep=ctx.keep,
        )  # fmt: skip
    for rec in records:
        row = {**base, "method": rec["method"]}
        if "error" in rec:
            key = "refused" if rec["method"] == "cudnn" else "error"
            out.append({**row, key: rec["error"].split(": ", 1)[-1].splitlines()[0][:200]})
            continue
        cuda = device.type == "cuda"
        peak = (rec["peak_mem_mb"] - rec["mem_before_mb"]) * 2**20 if cuda else None
        kept = ("converged", "newton_fallbacks", "newton_nonfinite", "auto_choice")
        row.update(
            time_s=rec["wall_time_s"], iters=rec["num_iters"], peak_bytes=peak,
            max_diff=rec["max_abs_diff_vs_sequential"],
            **{k: rec[k] for k in kept if k in rec},
        )  # fmt: skip
        if rec["method"] == "cudnn":
            row["backend"] = "cudnn" if torch.backends.cudnn.enabled else "aten"
        out.append(row)
    return out


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run(cfg: RNNForwardConfig, ctx: RunContext) -> dict[str, Any]:
    """Every method on every shape of the grid; see the module doc."""
    exact_arithmetic(ctx.device)  # equality is checked: no TF32
    trained = _trained(cfg, ctx.device)
    hidden = cfg.hidden if trained is None else (trained.hidden,)
    if trained is not None:
        ctx.log(
            f"  trained GRU {cfg.checkpoint}: hidden {trained.hidden}, valid "
            f"{trained.meta.get('valid_bits_per_char', float('nan')):.3f} bits/char; input: "
            f"{len(trained.heldout)} held-out characters, one-hot ({trained.vocab})"
        )
    rows = []
    start = time.perf_counter()
    shapes = [
        (kind, H, T, B)
        for T in sorted(cfg.lengths)
        for H in hidden
        for kind in cfg.cells
        for B in cfg.batches
    ]
    with torch.no_grad():
        for kind, H, T, B in shapes:
            shape = {"cell": kind, "hidden": H, "length": T, "batch": B}
            shape["weights"] = "random" if trained is None else "trained"
            if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                rows.append({**shape, "method": "all", "skipped": "time budget spent"})
                continue
            ctx.log(f"  {kind} hidden={H} T={T} batch={B}")
            try:
                new = _shape_rows(cfg, kind, H, T, B, ctx, trained)
            except RuntimeError as e:  # e.g. out of memory for the reference
                msg = str(e).splitlines()[0][:200]
                ctx.log(f"    failed: {msg}")
                new = [{**shape, "method": "all", "error": msg}]
            for r in new:
                if "time_s" in r:
                    ctx.log(
                        f"    {r['method']:<13} {r['time_s'] * 1e3:10.2f} ms  "
                        f"iters {r['iters']:<7} diff {r.get('max_diff', 0.0):.1e}"
                    )
            rows.extend(new)
    _speedups(rows)
    out: dict[str, Any] = {"weights": "random" if trained is None else "trained", "rows": rows}
    out["winners"] = winners(rows)
    if trained is not None:
        out["checkpoint"] = {
            "path": cfg.checkpoint,
            "hidden": trained.hidden,
            "vocab": trained.vocab,
            "text": trained.meta.get("text"),
            "valid_bits_per_char": trained.meta.get("valid_bits_per_char"),
            "heldout_chars": len(trained.heldout),
        }
    return out


def _speedups(rows: list[dict[str, Any]]) -> None:
    """vs_cudnn = cuDNN time / method time, per shape (None where cuDNN has no time)."""
    key = lambda r: (r["cell"], r["hidden"], r["length"], r["batch"])  # noqa: E731
    cudnn = {key(r): r["time_s"] for r in rows if r["method"] == "cudnn" and "time_s" in r}
    for r in rows:
        t = cudnn.get(key(r))
        r["vs_cudnn"] = t / r["time_s"] if t is not None and "time_s" in r else None


def winners(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each method wins: per shape (cell, hidden, T, batch), the fastest row that ran
    and reached the stopping rule, the runner-up, and the fastest method against cuDNN (None
    where cuDNN has no time: refused, or not a CUDA run)."""
    shapes: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "time_s" in r and r.get("converged", True):
            shapes.setdefault((r["cell"], r["hidden"], r["length"], r["batch"]), []).append(r)
    out = []
    for (cell, H, T, B), rs in sorted(shapes.items()):
        rs = sorted(rs, key=lambda r: r["time_s"])
        best = rs[0]
        parallel = next((r for r in rs if r["method"] not in _BASELINES), {})
        out.append(
            {
                "cell": cell,
                "hidden": H,
                "length": T,
                "batch": B,
                "winner": best["method"],
                "time_s": best["time_s"],
                "runner_up": rs[1]["method"] if len(rs) > 1 else None,
                "margin": rs[1]["time_s"] / best["time_s"] if len(rs) > 1 else None,
                "best_parallel": parallel.get("method"),
                "best_parallel_vs_cudnn": parallel.get("vs_cudnn"),
            }
        )
    return out


def winners_table(win: list[dict[str, Any]]) -> str:
    """The map of winners as text: one line per shape."""
    lines = [
        f"{'cell':<5} {'H':>4} {'T':>8} {'B':>3} {'fastest':<13} {'ms':>10} {'by':>6}  "
        f"{'best parallel':<13} {'vs cuDNN':>8}"
    ]
    for w in win:
        by = f"{w['margin']:5.2f}x" if w["margin"] else f"{'-':>6}"
        vs = w["best_parallel_vs_cudnn"]
        lines.append(
            f"{w['cell']:<5} {w['hidden']:>4} {w['length']:>8} {w['batch']:>3} "
            f"{w['winner']:<13} {w['time_s'] * 1e3:10.2f} {by}  {w['best_parallel'] or '-':<13} "
            f"{'-' if vs is None else f'{vs:7.2f}x':>8}"
        )
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time against T per method, one panel per (cell, hidden), first batch size."""
    rows = [r for r in records["rows"] if "time_s" in r]
    if not rows:
        return []
    B = min(r["batch"] for r in rows)
    panels = sorted({(r["cell"], r["hidden"]) for r in rows})
    n = len(panels)
    cols = min(3, n)
    fig, axes = plt.subplots(
        math.ceil(n / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(n / cols)), squeeze=False
    )
    for ax, (cell, H) in zip(axes.flat, panels, strict=False):
        for m in _METHODS:
            sel = sorted(
                (
                    r
                    for r in rows
                    if (r["cell"], r["hidden"], r["batch"], r["method"]) == (cell, H, B, m)
                ),
                key=lambda r: r["length"],
            )
            if sel:
                ax.loglog([r["length"] for r in sel], [r["time_s"] for r in sel], "o-", label=m)
        ax.set_title(f"{cell} hidden {H}, batch {B}")
        ax.set_xlabel("T")
        ax.set_ylabel("seconds")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    weights = records.get("weights", "random")
    fig.suptitle(f"rnn-forward on {records['env']['device_name']} ({weights} weights)")
    return [save_figure(fig, out_dir / "rnn_forward.png")]


def summary(records: dict[str, Any]) -> str:
    weights = records.get("weights", "random")
    head = f"weights: {weights}"
    if "checkpoint" in records:
        head += f" ({records['checkpoint']['path']})"
    lines = [
        head,
        f"{'cell':<5} {'H':>4} {'T':>8} {'B':>3} {'method':<13} {'ms':>10} {'iters':>7} "
        f"{'vs cuDNN':>8} {'max diff':>9}  note",
    ]
    for r in records["rows"]:
        note = r.get("refused") or r.get("skipped") or r.get("error") or ""
        if note:
            note = ("refused: " if "refused" in r else "") + note[:60]
        ms = f"{r['time_s'] * 1e3:10.2f}" if "time_s" in r else f"{'-':>10}"
        vs = f"{r['vs_cudnn']:8.2f}" if r.get("vs_cudnn") is not None else f"{'-':>8}"
        diff = f"{r['max_diff']:9.1e}" if "max_diff" in r else f"{'-':>9}"
        its = str(r.get("iters", "-"))
        lines.append(
            f"{r['cell']:<5} {r['hidden']:>4} {r['length']:>8} {r['batch']:>3} {r['method']:<13} "
            f"{ms} {its:>7} {vs} {diff}  {note}"
        )
    win = records.get("winners") or winners(records["rows"])
    if win:
        lines += ["", "where each method wins (fastest per shape; by: over the runner-up):"]
        lines.append(winners_table(win))
    return "\n".join(lines)


register_experiment(
    Experiment(
        name="rnn-forward",
        description="GRU/LSTM hidden states by sequential, Jacobi, Newton, quasi-Newton vs cuDNN",
        config=RNNForwardConfig,
        run=run,
        plot=plot,
        summary=summary,
        bench=(
            Case(
                "rnn-forward",
                (
                    "cells=[gru, lstm]",
                    "hidden=[4, 64, 256]",
                    "lengths=[1000, 10000]",
                    "batches=[1, 16]",
                    "methods=[cudnn, jacobi, quasi_newton]",
                    "loop_max_length=1",
                    "time_budget_s=240",
                    "repeats=3",
                    "warmup=1",
                ),
                default=False,
            ),
        ),  # fmt: skip
    )
)
