"""Issue 10 on one GPU, in one process: (1) the fast paths return what the plain paths return,
(2) `ffsolve bench` with the issue's targets printed beside the measured numbers.

Run from the repository root on the GPU machine (about 5-8 minutes on one H200):

    PYTHONPATH=src python3 benchmarks/gpu_fast.py            # writes under $OUT

Reads `checkpoints/made_mnist` (shipped) and, when present, `.carry/made_rgb` (the RGB
checkpoint, carried). On the CPU (no capture) a tiny setting proves the script end to end:

    PYTHONPATH=src python3 benchmarks/gpu_fast.py --device cpu --tiny

Every check prints PASS/FAIL with what differed and the script goes on; the summary table is
printed last; everything produced lands in $OUT (correctness.json, log.txt, bench.tgz).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.models.made import MADE, MADEConfig, load_made
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.problems.made import MADESampling, logistic_noise
from ffsolve.solvers import ConvergenceWarning

RESULTS: list[tuple[str, bool, str]] = []


class _Tee:
    """stdout also written to $OUT/log.txt."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "w")  # noqa: SIM115

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"  {'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def guarded(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # one failing step is logged, the next still runs
        traceback.print_exc()
        check(name, False, f"raised {type(e).__name__}: {e}")
    print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def made_correctness(device: torch.device, tiny: bool) -> None:
    if tiny:
        model = MADE(MADEConfig(dims=64, hidden=(64, 64), seed=0)).to(device)
        lam, B = 1e-6, 8
    else:
        model, meta = load_made("checkpoints/made_mnist", device)
        lam, B = float(meta["data"]["lam"]), 100
    cuda = device.type == "cuda"
    noise = logistic_noise(B, model.dims, torch.Generator().manual_seed(0), device)
    bounds = logit_bounds(lam)
    naive = MADESampling(model, noise, bounds)
    inc = MADESampling(model, noise, bounds, incremental=True)
    with torch.no_grad():
        ref = ffsolve.solve(naive, method="sequential", capture=False)
        for label, prob in (("naive", naive), ("incremental", inc)):
            eager = ffsolve.solve(prob, method="sequential", capture=False).value
            for rep in range(2):  # the second replays the cached graph
                got = ffsolve.solve(prob, method="sequential", capture="auto")
                check(
                    f"MADE sequential {label} captured == eager (bitwise, solve {rep + 1})",
                    torch.equal(got.value, eager) and got.stats.get("captured", False) == cuda,
                    f"max|diff|={diff(got.value, eager):.2e} captured={got.stats.get('captured')}",
                )
        d_inc = diff(ffsolve.solve(inc, method="sequential").value, ref.value)
        check("MADE incremental vs naive sequential (close)", d_inc < 1e-3, f"{d_inc:.2e}")
        for method, opts in (("jacobi", {}), ("jacobi_gs", {"block_size": 28 if not tiny else 8})):
            plain = ffsolve.solve(naive, method=method, capture=False, check_every=1, **opts)
            check(
                f"MADE {method} eager == sequential (bitwise)",
                torch.equal(plain.value, ref.value),
                f"max|diff|={diff(plain.value, ref.value):.2e} iters={plain.num_iters}",
            )
            for record in (False, True):
                for rep in range(2):
                    got = ffsolve.solve(naive, method=method, record=record, **opts)
                    same = torch.equal(got.value, ref.value) and got.num_iters == plain.num_iters
                    if record:
                        same = same and torch.equal(got.residuals, plain.residuals)
                        same = same and torch.equal(got.certified, plain.certified)
                    check(
                        f"MADE {method} captured (record={record}, solve {rep + 1}) == eager",
                        same and got.stats.get("captured", False) == cuda,
                        f"iters {got.num_iters} vs {plain.num_iters}, "
                        f"max|diff|={diff(got.value, ref.value):.2e}, "
                        f"captured={got.stats.get('captured')}",
                    )
        # a window evaluates a row subset of the head (another GEMM shape): close, not bitwise
        got = ffsolve.solve(naive, method="gs_jacobi", window=112 if not tiny else 16)
        d = diff(got.value, ref.value)
        check("MADE gs_jacobi (eager, windowed head) close to sequential", d < 1e-3, f"{d:.1e}")


def rnn_correctness(device: torch.device, tiny: bool) -> None:
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        T, H = (30, 16) if tiny else (300, 128)
        rnn = VanillaRNN(VanillaRNNConfig(hidden=H, seed=0)).to(device=device, dtype=dtype)
        params = [rnn.W_h, rnn.W_x, rnn.b_h]
        x = torch.rand(1, T, 1, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        w = torch.randn(1, T, H, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        _, hs = rnn(x)
        ref = torch.autograd.grad((torch.tanh(hs) * w).sum(), params)
        ref = torch.cat([g.reshape(-1) for g in ref])
        variants = [("jacobi fast VJP", {}), ("jacobi autograd sweeps", {"fast_vjp": False})]
        if device.type == "cuda":
            variants.append(("jacobi fast VJP captured", {"capture": True, "check_every": 8}))
        for label, kw in variants:
            hs2, info = ffsolve.backprop_through(
                rnn.step, rnn.initial_state(1), x, "jacobi", params=params, **kw
            )
            got = torch.autograd.grad((torch.tanh(hs2) * w).sum(), params)
            got = torch.cat([g.reshape(-1) for g in got])
            rel = float((got - ref).norm() / ref.norm())
            check(
                f"RNN adjoint {label} vs autograd BPTT ({dtype})",
                rel <= tol and info.converged,
                f"rel. error {rel:.1e} iters {info.num_iters}",
            )


def run_bench(device: torch.device, tiny: bool, out: Path, cases: list[str], budget_s: float):
    # run directories live outside $OUT (few files come back from it): packed into bench.tgz
    runs_root = Path(tempfile.mkdtemp(prefix="ffsolve-bench-"))
    """One `ffsolve bench CASE` per case (each writes its run directory as soon as it ends, so
    a late failure or the time limit loses nothing done before); then the targets of all."""
    from ffsolve.cli import main
    from ffsolve.experiments.bench_suite import check_targets, summary

    sets: list[str] = []
    if Path(".carry/made_rgb.safetensors").is_file():
        sets.append("rgb_checkpoint=.carry/made_rgb")
    if tiny:
        sets += [
            "batch=4",
            "batches=[1, 3]",
            "rnn_lengths=[20, 60]",
            "rnn_hidden=16",
            "repeats=1",
            "warmup=1",
            "breakeven_lengths=[16]",
            "breakeven_batches=[2]",
        ]
        cases = [c for c in cases if c not in ("made-mnist", "made-batch")]  # 784 dims: slow
    t0 = time.perf_counter()
    merged: dict = {"cases": {}}
    for case in cases:
        if time.perf_counter() - t0 > budget_s:
            check(f"bench {case}", False, f"skipped: the {budget_s:.0f} s budget is spent")
            continue
        argv = ["bench", case, "--device", device.type, "--out", str(runs_root)]
        for s in sets:
            argv += ["--set", s]
        print("\n$ ffsolve " + " ".join(argv), flush=True)
        rc = main(argv)
        check(f"bench {case} exit code", rc == 0, f"rc={rc}")
        runs = sorted((runs_root / "bench").glob("*/records.json"))
        if runs:
            rec = json.loads(runs[-1].read_text())
            merged["cases"].update(rec.get("cases", {}))
            merged.setdefault("env", rec.get("env"))
        with tarfile.open(out / "bench.tgz", "w:gz") as tar:
            tar.add(runs_root, arcname="runs")
    merged["targets"] = check_targets(merged)
    (out / "bench_records.json").write_text(json.dumps(merged))
    print("\n" + summary(merged), flush=True)
    for t in merged["targets"]:
        if t["status"] != "n/a":
            check(
                f"target {t['case']} {t['row']} {t['what']} {t['target']}",
                t["status"] == "pass",
                f"measured {t.get('measured'):.3g}: {t['status']}",
            )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny settings (CPU proof run)")
    p.add_argument(
        "--cases",
        nargs="*",
        default=["made-mnist", "rnn-backprop", "made-rgb", "made-batch", "breakeven"],
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no bench case after this many seconds of the script",
    )
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/ffsolve-fast-out"))
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = _Tee(sys.stdout, out / "log.txt")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(torch.cuda.get_device_name(device), "torch", torch.__version__, flush=True)
    warnings.simplefilter("ignore", ConvergenceWarning)
    t0 = time.perf_counter()
    print("== (1) correctness: captured vs eager vs sequential", flush=True)
    guarded("MADE correctness", lambda: made_correctness(device, args.tiny))
    guarded("RNN correctness", lambda: rnn_correctness(device, args.tiny))
    print("== (2) bench", flush=True)
    (out / "correctness.json").write_text(json.dumps(RESULTS, indent=1))
    budget = args.budget_s - (time.perf_counter() - t0)
    guarded("bench", lambda: run_bench(device, args.tiny, out, args.cases, budget))
    (out / "correctness.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"\n== summary ({time.perf_counter() - t0:.0f} s)")
    n_fail = sum(not ok for _, ok, _ in RESULTS)
    for name, ok, detail in RESULTS:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}  {detail if not ok else ''}")
    print(f"  {len(RESULTS) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
