"""The Newton guard on the trained character GRU (CPU): T = 300, batch 4, atol 1e-6, float64
and float32; Jacobi, quasi-Newton, Newton, Newton with guard=10: iterations, agreement with the
loop, seconds and the Newton counters. From the repository root:

    PYTHONPATH=src python benchmarks/cpu_gru_guard.py
"""

import time
import warnings

import torch

import ffsolve
from ffsolve.experiments.rnn_forward import _Trained
from ffsolve.problems import RecurrenceForward

COUNTERS = ("newton_fallbacks", "newton_nonfinite", "newton_blowups")
METHODS = (("jacobi", {}), ("quasi_newton", {}), ("newton", {}), ("newton", {"guard": 10.0}))

warnings.simplefilter("ignore")
for dtype in (torch.float64, torch.float32):
    trained = _Trained("checkpoints/gru_char", torch.device("cpu"), dtype)
    cell, _ = trained.build()
    T, B = 300, 4
    xs = trained.inputs(B, T).to(dtype)
    problem = RecurrenceForward(cell, torch.zeros(B, trained.hidden, dtype=dtype), xs)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        for method, kw in METHODS:
            t = time.perf_counter()
            sol = ffsolve.solve(problem, method=method, atol=1e-6, record=False, max_iters=T, **kw)
            dt = time.perf_counter() - t
            stats = {k: int(sum(v)) for k, v in sol.stats.items() if k in COUNTERS}
            diff = f"{(sol.value - ref).abs().max():.1e}"
            print(dtype, method, kw, sol.num_iters, sol.all_converged, diff, f"{dt:.1f}s", stats)
