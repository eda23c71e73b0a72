"""Where the time of one scan backward goes (the paper's RNN, hidden 128, batch 1, T = 100):
torch.profiler's per-op table (CPU and CUDA time) and cProfile's Python functions, beside
autograd's BPTT on the same loss; the scan with and without its cached CUDA graphs. First,
checks that the graph replays give the loop's answer (random dense and diagonal recurrences,
several shapes, twice each so a cached graph is replayed) and the scan's gradients autograd's.
Prints tables and PASS/FAIL lines only; no records.

From the repository root:  PYTHONPATH=src python benchmarks/profile_scan.py [cuda|cpu] [T]
"""

import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ffsolve
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
T = int(sys.argv[2]) if len(sys.argv) > 2 else 100
torch.backends.cuda.matmul.allow_tf32 = False
rnn = VanillaRNN(VanillaRNNConfig(hidden=128, seed=0)).to(dev)
params = [rnn.W_h, rnn.W_x, rnn.b_h, rnn.W_o, rnn.b_o]
x = torch.rand(1, T + 1, 1, generator=torch.Generator().manual_seed(0)).to(dev)


def loss_of(method):
    if method is None:
        _, hs = rnn(x[:, :-1])
    else:
        hs, _ = ffsolve.backprop_through(
            rnn.step, rnn.initial_state(1), x[:, :-1], method, params=params[:3]
        )
    return F.mse_loss(rnn.readout(hs), x[:, 1:])


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def loop(A, b):
    x, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        x = (A[:, t] * x if A.dim() == 3 else (A[:, t] @ x[..., None])[..., 0]) + b[:, t]
        out.append(x)
    return torch.stack(out, 1)


g = torch.Generator().manual_seed(0)
for B, n, F_, dense in (
    (1, 100, 128, True),
    (3, 37, 16, True),
    (2, 1000, 64, False),
    (1, 1, 4, True),
):
    for rep in range(2):  # the second call replays the cached graph
        A = (
            torch.randn(B, n, F_, F_, generator=g, dtype=torch.float64) / F_**0.5
            if dense
            else torch.rand(B, n, F_, generator=g, dtype=torch.float64)
        ).to(dev)
        b = torch.randn(B, n, F_, generator=g, dtype=torch.float64).to(dev)
        ref = loop(A, b)
        from ffsolve.problems.base import LinearRecurrence
        from ffsolve.solvers.scan import affine_scan

        rec = LinearRecurrence(b, lambda s, e, A=A: A[:, s:e], "dense" if dense else "diagonal")
        got = affine_scan(rec, capture=True)
        eager = affine_scan(rec, capture=False)
        err = float((got - ref).abs().max())
        same = bool(torch.equal(got, eager))
        ok = err < 1e-10
        print(
            f"{'PASS' if ok else 'FAIL'} graph scan B={B} n={n} F={F_} dense={dense} rep={rep}: "
            f"max |scan - loop| {err:.1e}, bitwise eager {same}"
        )


def scan_vs_autograd(xin, **options):
    """Relative error of the scan's gradients against autograd's, and the backprop info."""
    ref = torch.autograd.grad(F.mse_loss(rnn.readout(rnn(xin[:, :-1])[1]), xin[:, 1:]), params)
    hs, info = ffsolve.backprop_through(
        rnn.step, rnn.initial_state(1), xin[:, :-1], "scan", params=params[:3], **options
    )
    got = torch.autograd.grad(F.mse_loss(rnn.readout(hs), xin[:, 1:]), params)
    diff = torch.cat([(a - b).flatten() for a, b in zip(got, ref, strict=True)])
    return float(diff.norm() / torch.cat([a.flatten() for a in ref]).norm()), info


for graph in (True, False):
    rel, _ = scan_vs_autograd(x, capture_chunks=graph)
    print(
        f"{'PASS' if rel < 1e-5 else 'FAIL'} scan gradients (capture_chunks={graph}) vs autograd: "
        f"relative error {rel:.1e}"
    )


for seed in (1, 2):  # the second backward replays the captured graph on new inputs
    xg = torch.rand(1, T + 1, 1, generator=torch.Generator().manual_seed(seed)).to(dev)
    rel, info = scan_vs_autograd(xg, capture=dev.type == "cuda")
    graphed = bool(info.solution.stats.get("graphed_backward"))
    ok = rel < 1e-5 and (graphed or dev.type != "cuda")
    print(f"{'PASS' if ok else 'FAIL'} scan captured backward (input {seed}, graphed {graphed}) vs "
          f"autograd: relative error {rel:.1e}")  # fmt: skip


def loss_of_method(method):
    if method == "scan captured backward":
        hs, _ = ffsolve.backprop_through(rnn.step, rnn.initial_state(1), x[:, :-1], "scan",
                                         params=params[:3], capture=dev.type == "cuda")  # fmt: skip
        return F.mse_loss(rnn.readout(hs), x[:, 1:])
    if method == "scan capture_chunks=False":
        hs, _ = ffsolve.backprop_through(
            rnn.step,
            rnn.initial_state(1),
            x[:, :-1],
            "scan",
            params=params[:3],
            capture_chunks=False,
        )
        return F.mse_loss(rnn.readout(hs), x[:, 1:])
    return loss_of(method)


for method in (None, "scan", "scan capture_chunks=False", "scan captured backward"):
    name = method or "autograd"
    loss = loss_of_method(method)
    for _ in range(5):
        torch.autograd.grad(loss, params, retain_graph=True)
    sync()
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        torch.autograd.grad(loss, params, retain_graph=True)
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"== {name}: backward median {ts[10] * 1e3:.3f} ms, min {ts[0] * 1e3:.3f} ms")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(10):
            torch.autograd.grad(loss, params, retain_graph=True)
        sync()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=40))
    if method == "scan":
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            torch.autograd.grad(loss, params, retain_graph=True)
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
