"""One solve across several GPUs (or CPU processes): `Sharded` against one device.

Run under torchrun, one process per GPU (NCCL; gloo on the CPU), from the repository root:

    torchrun --nproc-per-node 2 benchmarks/sharded.py --device cuda --out $OUT/sharded-2.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/sharded.py --device cuda ...
    torchrun --nproc-per-node 2 benchmarks/sharded.py --device cpu --tiny     # a CPU proof

Cases: DDPM-1000 and DDIM-100 at batch 1 on the shipped `checkpoints/ddpm_mnist` (picard and
anderson over Picard's map, windows `--windows`, ParaDiGMS's tolerance 0.1), a GRU forward
(hidden 256, batch 1, T = `--gru-length`, Jacobi at atol 1e-5), and the sharded linear solves
on the same GRU at T = `--linear-length` (quasi_newton and newton on the forward, scan on its
BPTT adjoint; one chunk of Jacobians per rank's slice). On one rank (world size 1)
every case also times the captured sequential loop, the baseline of the issue; on several it
times the same methods sharded. Every rank solves; rank 0 times (the median of `--repeats`
after a warm-up, synchronised), checks against the sequential answer and writes one JSON
record: GPU name, torch version, commit, date, world size, rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import warnings

import torch
import torch.distributed as dist

import ffsolve
from ffsolve.problems import (
    DiffusionSampling,
    RecurrenceAdjoint,
    RecurrenceForward,
    Sharded,
    diffusion_noise,
)
from ffsolve.problems.recurrence import torch_cell_jacobian


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _time(fn, device, repeats):
    fn()  # warm-up (captures, allocations)
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _diffusion_cases(args, device):
    from ffsolve.models.ddpm import ddpm_scheduler, load_ddpm

    unet, mcfg, _ = load_ddpm(args.checkpoint, device)
    base = ddpm_scheduler(mcfg)
    import diffusers

    for name in args.schedules:
        kind, steps = name.split("-")
        cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
        sched = cls.from_config(base.config)
        sched.set_timesteps(int(steps))
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x_T, z = diffusion_noise(1, shape, int(steps), torch.Generator().manual_seed(0), device)
        problem = DiffusionSampling(unet, sched, x_T, z)
        stop = ffsolve.Stopping(atol=0.1, rule="variance", record=False)
        methods = [(f"picard(window={w})", "picard", {"window": w}) for w in args.windows]
        methods += [
            (f"anderson(window={w})", "anderson", {"window": w, "base": "picard"})
            for w in args.windows
        ]
        yield name, problem, stop, methods


def _gru_cases(args, device):
    torch.manual_seed(0)
    H = 16 if args.tiny else 256
    cell = torch.nn.GRUCell(H, H).to(device)
    with torch.no_grad():  # a contracting cell, as a trained one is
        for p in cell.parameters():
            p.mul_(0.5)
    h0 = torch.zeros(1, H, device=device)
    xs = torch.randn(1, args.gru_length, H, device=device)
    problem = RecurrenceForward(cell, h0, xs)
    stop = ffsolve.Stopping(atol=1e-5, record=False)
    yield f"gru-forward-T{args.gru_length}", problem, stop, [("jacobi", "jacobi", {})]
    # the sharded linear solves (each rank forms the Jacobians of its own positions only), at
    # a length where dense (H, H) Jacobians fit one chunk (no second scan of a rank's slice):
    # quasi-Newton (diagonal) and Newton (dense) on the forward, the scan on its BPTT adjoint
    n = args.linear_length
    short = RecurrenceForward(cell, h0, xs[:, :n])
    newtons = [(m, m, {"chunk": n}) for m in ("quasi_newton", "newton")]
    yield f"gru-forward-T{n}", short, stop, newtons
    hs = ffsolve.solve(short, method="sequential", record=False).value  # (1, n, H)
    h_prev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)  # (1, n, H): h_0..h_{n-1}
    grad_h = torch.randn(1, n, H, generator=torch.Generator().manual_seed(1)).to(device)
    adjoint = RecurrenceAdjoint(lambda h, x: cell(x, h), h_prev, xs[:, :n], grad_h,
                                jacobian=torch_cell_jacobian(cell), structure=cell)  # fmt: skip
    yield f"gru-adjoint-T{n}", adjoint, stop, [("scan", "scan", {"chunk": n})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="sharded.json")
    ap.add_argument("--checkpoint", default="checkpoints/ddpm_mnist")
    ap.add_argument("--schedules", nargs="+", default=["ddpm-1000", "ddim-100"])
    ap.add_argument("--windows", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--gru-length", type=int, default=1_000_000)
    ap.add_argument("--linear-length", type=int, default=4096,
                    help="T of the GRU's newton, quasi_newton and scan cases")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a CPU proof: tiny sizes")
    args = ap.parse_args()
    if args.tiny:
        args.schedules, args.windows, args.gru_length = ["ddim-10"], [4], 200
        args.linear_length = 64
        args.repeats = 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ffsolve.ConvergenceWarning)
        for case in (*_diffusion_cases(args, device), *_gru_cases(args, device)):
            name, problem, stop, methods = case
            seq = ffsolve.solve(problem, method="sequential", record=False).value
            if world == 1:
                t, _ = _time(
                    lambda p=problem: ffsolve.solve(p, method="sequential", record=False),
                    device,
                    args.repeats,
                )
                rows.append({"case": name, "method": "sequential (captured where it can)",
                             "seconds": t})  # fmt: skip
            target = problem if world == 1 else Sharded(problem)
            for label, method, opts in methods:
                t, sol = _time(lambda s=target, m=method, o=opts, st=stop:
                               ffsolve.solve(s, method=m, stopping=st, **o),
                               device, args.repeats)  # fmt: skip
                diff = float((sol.value[:, -1] - seq[:, -1]).abs().max())
                rows.append({"case": name, "method": label, "seconds": t,
                             "sweeps": sol.num_iters, "captured": bool(sol.stats.get("captured")),
                             "max_abs_diff_last_position": diff})  # fmt: skip
                if rank == 0:
                    print(f"{name:22s} {label:24s} world={world} {1e3 * t:10.2f} ms "
                          f"sweeps={sol.num_iters} diff={diff:.2e}", flush=True)  # fmt: skip
    if rank == 0:
        commit = (
            os.environ.get("FFSOLVE_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        )
        record = {
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
