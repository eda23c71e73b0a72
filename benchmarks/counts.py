"""CPU-side counts quoted in the README and the closing notes, in one script:

1. aten ops of one captured-loop step of Jacobi on the shipped MADE MNIST (batch 100, exact,
   record=False), split into the model's sweep and the loop's bookkeeping;
2. aten ops of one backward of the paper's RNN (hidden 128, T = 100) by `scan`, with the
   model's closed-form `step_jacobian` and with the generic path (vector-Jacobian products),
   and the kernels of the chunk's scan alone (what a CUDA graph replays on a GPU);
3. FLOPs of a PixelCNN++ forward (shipped MNIST batch 16, RGB batch 4);
4. sweeps of a Jacobi forward of the paper's RNN (float32) at atol 1e-6 and 1e-5, T from 100
   to 10,000, and the largest difference from the loop.

From the repository root:  PYTHONPATH=src python benchmarks/counts.py
"""

import collections
import subprocess
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.models.made import load_made
from ffsolve.models.pixelcnnpp import load_pixelcnnpp
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.problems import RecurrenceForward
from ffsolve.problems.made import MADESampling, logistic_noise
from ffsolve.solvers import get_solver, loop

VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "t",
         "transpose", "permute", "alias", "detach", "as_strided"}  # fmt: skip


class Count(TorchDispatchMode):
    """aten ops dispatched while `on` (views are no kernels: counted apart)."""

    def __init__(self):
        super().__init__()
        self.ops, self.on = collections.Counter(), True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(v for k, v in self.ops.items() if k not in VIEWS)


def made_step_ops() -> None:
    model, meta = load_made("checkpoints/made_mnist")
    noise = logistic_noise(100, 784, torch.Generator().manual_seed(0))
    problem = MADESampling(model, noise, logit_bounds(float(meta["data"]["lam"])))
    step, sweep, n = loop._Loop.step, get_solver("jacobi").sweep, 3
    whole, model_only = Count(), Count()
    whole.on = model_only.on = False

    def counted_step(self, a, b):
        whole.on = True
        step(self, a, b)
        whole.on = False

    def counted_sweep(self_, problem, s, a, b, memory):
        model_only.on = True
        out = sweep(problem, s, a, b, memory)
        model_only.on = False
        return out

    loop._Loop.step = counted_step
    solver = get_solver("jacobi")
    object.__setattr__(solver, "sweep", counted_sweep.__get__(solver))
    with whole, model_only, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver.solve(problem, record=False, max_iters=n)
    loop._Loop.step = step
    total, mdl = whole.kernels() / n, model_only.kernels() / n
    print(f"1. MADE Jacobi step: {total:.0f} kernels, {mdl:.0f} of them the model's sweep, "
          f"{total - mdl:.0f} bookkeeping")  # fmt: skip


def scan_backward_ops() -> None:
    rnn = VanillaRNN(VanillaRNNConfig(hidden=128, seed=0))
    params = [rnn.W_h, rnn.W_x, rnn.b_h, rnn.W_o, rnn.b_o]
    x = torch.rand(1, 101, 1, generator=torch.Generator().manual_seed(0))
    for label, cell in (("closed form (step_jacobian)", rnn.step),
                        ("generic (VJPs)", lambda h, u: rnn.step(h, u))):  # fmt: skip
        hs, _ = ffsolve.backprop_through(cell, rnn.initial_state(1), x[:, :-1], "scan",
                                         params=params[:3])  # fmt: skip
        loss = F.mse_loss(rnn.readout(hs), x[:, 1:])
        with Count() as c:
            torch.autograd.grad(loss, params)
        print(f"2. scan backward, T = 100, {label}: {sum(c.ops.values())} ops, "
              f"{c.kernels()} of them kernels")  # fmt: skip
    # the part a CUDA graph replays on a GPU (one launch and 3 copies there)
    from ffsolve.solvers.scan import _scan_chunk

    A, b = torch.rand(1, 100, 128, 128), torch.rand(1, 100, 128)
    with Count() as c:
        _scan_chunk(A, b, False)
    print(f"2. of which the chunk's scan (T = 100, F = 128): {c.kernels()} kernels")


def pixelcnn_flops() -> None:
    for name, batch in (("checkpoints/pixelcnnpp_mnist", 16), ("checkpoints/pixelcnnpp_rgb", 4)):
        model, _ = load_pixelcnnpp(name)
        c = model.config
        with torch.no_grad(), FlopCounterMode(display=False) as f:
            model(torch.zeros(batch, c.channels, c.height, c.width))
        print(f"3. {name}, batch {batch}: {f.get_total_flops() / 1e9:.1f} GFLOP per forward")


def forward_sweeps() -> None:
    rnn = VanillaRNN(VanillaRNNConfig(hidden=128, seed=0))
    for T in (100, 1000, 3000, 10000):
        x = torch.rand(1, T, 1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, ref = rnn(x)
            problem = RecurrenceForward(rnn.step, rnn.initial_state(1), x)
            for atol in (1e-6, 1e-5):
                t = time.perf_counter()
                sol = ffsolve.solve(problem, method="jacobi", atol=atol, check_every=8,
                                    record=False)  # fmt: skip
                diff = (problem.states(sol.value) - ref).abs().max().item()
                print(f"4. RNN forward by Jacobi, T = {T}, atol {atol:g}: {sol.num_iters} sweeps, "
                      f"max diff {diff:.1e}, {time.perf_counter() - t:.2f} s")  # fmt: skip


if __name__ == "__main__":
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"commit {head.stdout.strip()}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")  # fmt: skip
    made_step_ops()
    scan_backward_ops()
    pixelcnn_flops()
    forward_sweeps()
