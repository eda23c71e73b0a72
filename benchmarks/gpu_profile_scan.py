"""Where the time of one scan backward goes (the paper's RNN, hidden 128, batch 1, T = 100):
torch.profiler's per-op table (CPU and CUDA time) and cProfile's Python functions, beside
autograd's BPTT on the same loss. Prints tables only; no records.

From the repository root:  PYTHONPATH=src python benchmarks/gpu_profile_scan.py [cuda|cpu] [T]
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


for method in (None, "scan"):
    name = method or "autograd"
    loss = loss_of(method)
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
    if method is not None:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            torch.autograd.grad(loss, params, retain_graph=True)
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
