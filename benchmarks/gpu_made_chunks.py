"""Which chunk schedule should the captured loop use by default? Jacobi on the shipped MADE
MNIST, captured, timed with each schedule side by side in one process (median of 9 after 3
warm-up solves; the captured incremental sampler, the strongest sequential baseline, beside
them). A schedule trades frozen sweeps past convergence against host reads.

From the repository root:  PYTHONPATH=src python benchmarks/gpu_made_chunks.py [cuda|cpu]
"""

import os
import subprocess
import sys
import time

import torch

from ffsolve.bench import measure
from ffsolve.data import logit_bounds
from ffsolve.models.made import load_made
from ffsolve.problems.made import MADESampling, logistic_noise
from ffsolve.solvers import get_solver

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
tiny = dev.type == "cpu"
# the device copy's .git names the session's base commit: FFSOLVE_COMMIT wins
head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
commit = os.environ.get("FFSOLVE_COMMIT") or head.stdout.strip()
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
print(f"{name}, torch {torch.__version__}, commit {commit}, "
      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")  # fmt: skip
model, meta = load_made("checkpoints/made_mnist", dev)
bounds = logit_bounds(float(meta["data"]["lam"]))
schedules = [16, (16, 4), (16, 8), (32, 4), (32, 8)]
batches = [2] if tiny else [1, 16, 64, 100, 256, 1024]
warm, reps = (1, 1) if tiny else (3, 9)


def timed(solver, problem, **kw):
    with torch.no_grad():
        return measure(lambda: solver.solve(problem, record=False, **kw), dev, warm, reps)


print("batch  iters  incremental ms  " + "  ".join(f"{str(s):>9}" for s in schedules))
for B in batches:
    noise = logistic_noise(B, model.dims, torch.Generator().manual_seed(0), dev)
    base = timed(get_solver("sequential"), MADESampling(model, noise, bounds, incremental=True))
    row = [
        timed(get_solver("jacobi"), MADESampling(model, noise, bounds), check_every=s)
        for s in schedules
    ]
    first = row[0]["result"]
    same = all(torch.equal(r["result"].value, first.value) for r in row)
    print(
        f"{B:5d}  {first.num_iters:5d}  {base['median_s'] * 1e3:14.3f}  "
        + "  ".join(f"{r['median_s'] * 1e3:9.3f}" for r in row)
        + ("" if same else "  (values differ!)")
    )
