"""Sweeps of every method on the shipped models: how many parallel iterations each needs to
return the sequential answer, which does not depend on the device (only their cost does).

Per model: jacobi, anderson (history 3, over Jacobi's map; over Picard's too where the problem
is first order), and on first-order problems picard and quasi_newton; each exact (atol 0,
bitwise) unless said, with its largest difference to the sequential loop.

- MADE MNIST, batch 16;
- PixelCNN++ MNIST, batch 1;
- the trained character GRU forward, T = 1,000, batch 4, atol 1e-6 (float32);
- the DDPM MNIST (CPU-trained) with DDIM-25 and DDPM-100, batch 2, exact and at
  ParaDiGMS's tolerance 0.1 (variance rule, window 16 for picard and anderson).

From the repository root:  PYTHONPATH=src python benchmarks/sweeps.py [OUT.json [PART ...]]
(parts: made, gru, ddpm, pixelcnn; default all)
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.solvers import ConvergenceWarning

METHODS = [
    ("jacobi", {}),
    ("anderson", {"history": 3}),
    ("anderson", {"history": 3, "base": "picard"}),
    ("picard", {}),
    ("quasi_newton", {}),
]


def _rows(name, problem, stops, reference, methods=METHODS):
    out = []
    for method, opts in methods:
        if not problem.first_order and (method in ("picard", "quasi_newton") or opts.get("base")):
            continue
        for tag, stop in stops.items():
            t0 = time.perf_counter()
            label = method + (f"({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    sol = ffsolve.solve(problem, method=method, stopping=stop, **opts)
            except ffsolve.NonFiniteError as e:  # a diverging method: what it does there
                print(f"  {name:<24} {label:<34} {tag:<10} {str(e)[:60]}", flush=True)
                out.append({"model": name, "method": label, "stopping": tag, "error": str(e)})
                continue
            row = {
                "model": name,
                "method": label,
                "stopping": tag,
                "sweeps": sol.num_iters,
                "converged": sol.all_converged,
                "max_abs_diff": float((sol.value - reference).abs().max()),
                "cpu_seconds": round(time.perf_counter() - t0, 2),
            }  # fmt: skip
            print(f"  {name:<24} {row['method']:<34} {tag:<10} {row['sweeps']:>5} sweeps  "
                  f"diff {row['max_abs_diff']:.1e}", flush=True)  # fmt: skip
            out.append(row)
    return out


def made() -> list[dict]:
    from ffsolve.models.made import load_made
    from ffsolve.problems import MADESampling, logistic_noise

    model, meta = load_made("checkpoints/made_mnist")
    noise = logistic_noise(16, model.dims, torch.Generator().manual_seed(0))
    p = MADESampling(model, noise, logit_bounds(float(meta["data"]["lam"])))
    ref = ffsolve.solve(p, method="sequential").value
    return _rows("MADE MNIST, 16", p, {"exact": ffsolve.Stopping()}, ref)


def pixelcnn() -> list[dict]:
    from ffsolve.models.pixelcnnpp import load_pixelcnnpp
    from ffsolve.problems import PixelCNNSampling
    from ffsolve.problems.pixelcnn import pixelcnn_noise

    model, _ = load_pixelcnnpp("checkpoints/pixelcnnpp_mnist")
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    gumbel, logistic = pixelcnn_noise(1, (cfg.channels, cfg.height, cfg.width), cfg.mixtures, g)
    p = PixelCNNSampling(model, gumbel, logistic)
    ref = ffsolve.solve(p, method="sequential").value
    stops = {"exact": ffsolve.Stopping()}
    return _rows("PixelCNN++ MNIST, 1", p, stops, ref, METHODS[:2])


def gru() -> list[dict]:
    from ffsolve.models.char_gru import load_char_gru
    from ffsolve.problems import RecurrenceForward

    model, heldout, _ = load_char_gru("checkpoints/gru_char", "cpu")
    B, T = 4, 1000
    N = len(heldout)
    idx = (torch.arange(B)[:, None] * (N // B) + torch.arange(T)[None]) % N
    xs = model.one_hot(heldout[idx])
    p = RecurrenceForward(
        model.cell().requires_grad_(False), torch.zeros(B, model.config.hidden), xs
    )
    ref = ffsolve.solve(p, method="sequential").value
    windowed = [("picard", {"window": 64}), ("anderson", {"history": 3, "base": "picard",
                                                          "window": 64})]  # fmt: skip
    stops = {"atol=1e-6": ffsolve.Stopping(atol=1e-6)}
    return _rows("GRU char, T=1000, 4", p, stops, ref, [*METHODS, *windowed])


def ddpm() -> list[dict]:
    import diffusers

    from ffsolve.models.ddpm import ddpm_scheduler, load_ddpm
    from ffsolve.problems import DiffusionSampling, diffusion_noise

    unet, cfg, _ = load_ddpm("checkpoints/ddpm_mnist")
    out = []
    for kind, steps in (("ddim", 25), ("ddpm", 100)):
        base = ddpm_scheduler(cfg)
        sched = diffusers.DDIMScheduler.from_config(base.config) if kind == "ddim" else base
        sched.set_timesteps(steps)
        x_T, z = diffusion_noise(2, (1, 28, 28), steps, torch.Generator().manual_seed(0))
        p = DiffusionSampling(unet, sched, x_T, z, eta=0.0)
        ref = ffsolve.solve(p, method="sequential").value
        stops = {"exact": ffsolve.Stopping(),
                 "tol=0.1": ffsolve.Stopping(atol=0.1, rule="variance")}  # fmt: skip
        # (no quasi_newton: its generic diagonal Jacobian, 784 vector-Jacobian products of
        # the UNet at once, ran out of the 24 GB of the CPU machine)
        methods = [(m, {**o, **({"window": 16} if m != "jacobi" else {})})
                   for m, o in METHODS if m != "quasi_newton"]  # fmt: skip
        out += _rows(f"DDPM MNIST {kind}-{steps}, 2", p, stops, ref, methods)
    return out


PARTS = {"made": made, "gru": gru, "ddpm": ddpm, "pixelcnn": pixelcnn}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else None
    parts = sys.argv[2:] or list(PARTS)
    torch.manual_seed(0)
    rows = []
    for name in parts:
        with torch.no_grad():
            rows += PARTS[name]()
        if out:  # after every part: what finished is kept
            with open(out, "w") as f:
                json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
