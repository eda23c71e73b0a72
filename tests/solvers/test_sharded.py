"""Sharded: one solve across 2 and 4 processes (gloo on the CPU), each evaluating its slice of
every sweep, gives the single-process answer: bitwise where a slice runs the kernels of the
whole sweep (a function evaluated whole and narrowed, MADE), to rounding where the shapes
differ (an MLP step on fewer positions), with the same sweeps and certificate."""

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_picard_anderson import NoisyChain

import ffsolve
from ffsolve.problems.sharded import shard_bounds

D64 = torch.float64
HERE = Path(__file__).resolve().parent
METHODS = [
    ("jacobi", {}),
    ("gs_jacobi", {"window": 7}),
    ("picard", {}),
    ("picard", {"window": 9}),
    ("anderson", {"base": "picard", "window": 9}),
    ("jacobi_gs", {"block_size": 5}),
]


def _function_problem():
    x0 = torch.zeros(3, 37, 2, dtype=D64)
    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=D64)

    def fn(x):  # position t reads positions < t only (an exclusive running sum)
        before = torch.cumsum(x, dim=1).roll(1, dims=1)
        before[:, 0] = 0.0
        return torch.tanh(0.3 * before @ w + 0.5)

    return ffsolve.problems.FunctionProblem(fn, x0)


def _chain():
    torch.manual_seed(0)  # the same MLP in every process
    return NoisyChain(T=41, B=2, F=3)


def _solve_all(make, sharded):
    from ffsolve.problems import Sharded

    out = {}
    with torch.no_grad():
        for method, opts in METHODS:
            problem = make()
            if method in ("picard", "anderson") and not problem.first_order:
                continue
            problem = Sharded(problem) if sharded else problem
            sol = ffsolve.solve(problem, method=method, **opts)
            key = f"{method}{sorted(opts.items())}"
            out[key] = (sol.value, sol.num_iters, sol.certified, sol.stats["iters_per_item"])
    return out


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        got = {"function": _solve_all(_function_problem, True), "chain": _solve_all(_chain, True)}
        widths = []  # what this rank's model evaluates per sweep: its slice only
        chain = _chain()
        inner = chain.evaluate
        chain.evaluate = lambda x, s, e: widths.append(e - s) or inner(x, s, e)
        from ffsolve.problems import Sharded

        with torch.no_grad():
            ffsolve.solve(Sharded(chain), method="jacobi")
        got["widths"] = sorted(set(widths))
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(got, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_bounds_cover_every_position_once():
    for width in range(1, 30):
        for world in (1, 2, 3, 4, 8):
            owned = []
            for r in range(world):
                start, offset, n = shard_bounds(width, world, r)
                chunk = -(-width // world)
                assert start >= 0 and start + chunk <= width  # a full slice inside the sweep
                owned += range(start + offset, start + offset + n)
            assert owned == list(range(width))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_sharded_solve_is_the_single_process_one(tmp_path, world):
    out = str(tmp_path / "got")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from test_sharded import _rank_main; _rank_main({r}, {world}, {port}, {out!r})",
            ],
            env=env,
            cwd=str(HERE),
        )  # fmt: skip
        for r in range(world)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    ref = {"function": _solve_all(_function_problem, False), "chain": _solve_all(_chain, False)}
    for r in range(world):
        with open(f"{out}.{r}", "rb") as f:
            got = pickle.load(f)
        assert got["widths"] == [-(-41 // world)]  # ceil(T / world) positions a sweep
        for name, rows in ref.items():
            assert set(got[name]) == set(rows)
            for key, (value, iters, cert, per_item) in rows.items():
                g_value, g_iters, g_cert, g_per_item = got[name][key]
                if name == "function":  # the whole function, narrowed: the same kernels
                    assert torch.equal(g_value, value), key
                    assert g_iters == iters and g_per_item == per_item, key
                    assert torch.equal(g_cert, cert), key
                else:  # the MLP on a rank's slice: other shapes, rounding
                    torch.testing.assert_close(g_value, value, rtol=1e-12, atol=1e-12)


def test_sharded_needs_a_process_group():
    from ffsolve.problems import Sharded

    with pytest.raises(RuntimeError, match="process group"):
        Sharded(_chain())
