"""Sharded: one solve across 2 and 4 processes (gloo on the CPU), each evaluating its slice of
every sweep, gives the single-process answer: bitwise where a slice runs the kernels of the
whole sweep (a function evaluated whole and narrowed, MADE), to rounding where the shapes
differ (an MLP step on fewer positions), with the same sweeps and certificate. The linear
solve of scan and newton is sharded too: each rank forms the coefficients (Jacobians) of its
own positions only, and the combination over the ranks equals the single-process scan to
rounding (`_ULPS` ulps per position)."""

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
from ffsolve.problems import LinearRecurrence, LinearRecurrenceProblem, RecurrenceForward
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


#: ulps (of the solution's scale) per position by which a sharded scan may differ from the
#: single-process one: both round a differently ordered sum of products (the scan's levels,
#: then the entering state), whose terms are at most that scale on these contracting
#: recurrences; measured at most 0.24 (2 and 4 ranks, float64)
_ULPS = 2
_LENGTH = 37


def _coefficients(kind, T=_LENGTH, B=2, F=3):
    g = torch.Generator().manual_seed(5)
    if kind == "diagonal":
        A = torch.rand(B, T, F, dtype=D64, generator=g) * 1.1
    else:
        A = torch.randn(B, T, F, F, dtype=D64, generator=g) * 0.5 / F**0.5
    return A, torch.randn(B, T, F, dtype=D64, generator=g)


class MatvecRecurrence(LinearRecurrenceProblem):
    """A dense recurrence that hands out its A_t as products A_t v only."""

    def linear_recurrence(self):
        return LinearRecurrence(
            self.b, lambda s, e: lambda v: (self.A[:, s:e] @ v[..., None])[..., 0], "matvec"
        )


def _recurrence_cases():
    """(name, make problem, method, options): the linear solves that scan and newton shard."""
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(3, 23, 2, dtype=D64, generator=g)
    h0 = torch.randn(3, 6, dtype=D64, generator=g)

    def cell(kind):
        torch.manual_seed(1)  # the same cell in every process
        return (torch.nn.RNNCell if kind == "tanh" else torch.nn.GRUCell)(2, 6).to(D64)

    cases = [
        ("scan-dense", lambda: LinearRecurrenceProblem(*_coefficients("dense")), "scan", {}),
        ("scan-dense-chunks", lambda: LinearRecurrenceProblem(*_coefficients("dense")), "scan",
         {"chunk": 4}),
        ("scan-diagonal", lambda: LinearRecurrenceProblem(*_coefficients("diagonal")), "scan",
         {}),
        ("scan-matvec", lambda: MatvecRecurrence(*_coefficients("dense")), "scan", {}),
        ("scan-short", lambda: LinearRecurrenceProblem(*_coefficients("dense", T=3)), "scan",
         {}),  # fewer positions than 4 ranks: an empty slice is the identity map
    ]  # fmt: skip
    for kind, method, opts in (
        ("tanh", "newton", {}),
        ("tanh", "quasi_newton", {}),
        ("gru", "newton", {"chunk": 5}),  # several chunks of Jacobians on a rank's slice
    ):
        cases.append((f"{method}-{kind}", lambda k=kind: RecurrenceForward(cell(k), h0, xs),
                      method, opts))  # fmt: skip
    return cases


def _counted(problem):
    """The problem, recording the positions its evaluate, jacobians and coefficients cover."""
    seen = {"evaluate": [], "coeffs": []}
    evaluate, jacobians = problem.evaluate, problem.jacobians
    problem.evaluate = lambda x, s, e: seen["evaluate"].append(e - s) or evaluate(x, s, e)
    problem.jacobians = lambda x, s, e, d=False: (
        seen["coeffs"].extend(range(s, e)) or jacobians(x, s, e, d)
    )
    if isinstance(problem, LinearRecurrenceProblem):  # scan asks the recurrence for its A_t
        recurrence = problem.linear_recurrence

        def counted_recurrence():
            rec = recurrence()

            def coeffs(s, e):
                seen["coeffs"].extend(range(s, e))
                return rec.coeffs(s, e)

            return LinearRecurrence(rec.b, coeffs, rec.kind)

        problem.linear_recurrence = counted_recurrence
    return problem, seen


def _solve_recurrences(sharded):
    from ffsolve.problems import Sharded

    out, fixed = {}, {}
    with torch.no_grad():
        for name, make, method, opts in _recurrence_cases():
            problem, seen = _counted(make())
            kind = name.split("-")[1]
            if method != "scan" and kind not in fixed:  # the fixed point of the same sweep
                fixed[kind] = ffsolve.solve(Sharded(make()) if sharded else make(),
                                            method="jacobi").value  # fmt: skip
            sol = ffsolve.solve(Sharded(problem) if sharded else problem, method=method, **opts)
            out[name] = {"value": sol.value, "iters": sol.num_iters, "jacobi": fixed.get(kind),
                         "converged": sol.all_converged, "seen": seen, "length": problem.length,
                         "chunk": opts.get("chunk")}  # fmt: skip
    return out


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
        got["recurrences"] = _solve_recurrences(True)
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


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    """(world, every rank's results): one solve of every case per rank, spawned once."""
    world = request.param
    out = str(tmp_path_factory.mktemp(f"world{world}") / "got")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            # the ffsolve this test imported (a relative PYTHONPATH would not follow the cwd)
            [
                str(HERE),
                str(HERE.parent),
                str(Path(ffsolve.__file__).resolve().parents[1]),
                os.environ.get("PYTHONPATH", ""),
            ]
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
    got = []
    for r in range(world):
        with open(f"{out}.{r}", "rb") as f:
            got.append(pickle.load(f))
    return world, got


@pytest.mark.slow
def test_a_sharded_solve_is_the_single_process_one(ranks):
    world, got_all = ranks
    ref = {"function": _solve_all(_function_problem, False), "chain": _solve_all(_chain, False)}
    for got in got_all:
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


@pytest.mark.slow
def test_sharded_scan_and_newton_are_the_single_process_ones(ranks):
    """Every rank holds the same solution, the single-process one to `_ULPS` ulps a position
    (scan), or the bitwise fixed point of the sharded evaluation (newton, as Jacobi's on the
    same Sharded problem); each rank forms the coefficients of its own positions only."""
    world, got_all = ranks
    ref = _solve_recurrences(False)
    eps = torch.finfo(D64).eps
    for r, got in enumerate(got_all):
        assert set(got["recurrences"]) == set(ref)
        for name, want in ref.items():
            mine = got["recurrences"][name]
            T = want["length"]
            assert mine["converged"], name
            assert torch.equal(mine["value"], got_all[0]["recurrences"][name]["value"]), name
            tol = _ULPS * eps * T * float(want["value"].abs().max().clamp_min(1.0))
            torch.testing.assert_close(mine["value"], want["value"], rtol=0, atol=tol)
            start, offset, n = shard_bounds(T, world, r)
            own = list(range(start + offset, start + offset + n))
            if name.startswith("scan"):
                assert mine["iters"] == 1
                assert mine["seen"]["evaluate"] == []  # a scan never evaluates
            else:  # newton: the fixed point of the sharded sweep, within T sweeps
                assert torch.equal(mine["value"], mine["jacobi"]), name
                assert mine["iters"] <= T
                assert set(mine["seen"]["evaluate"]) == {-(-T // world)}, name
                assert len(mine["seen"]["evaluate"]) == mine["iters"], name
            # the coefficients of this rank's positions, each once a sweep (a second scan
            # from the entering state forms them again where the slice is several chunks)
            per_sweep = 2 if mine["chunk"] is not None and n > mine["chunk"] else 1
            assert sorted(set(mine["seen"]["coeffs"])) == own, name
            assert len(mine["seen"]["coeffs"]) == per_sweep * mine["iters"] * n, name


def test_sharded_needs_a_process_group():
    from ffsolve.problems import Sharded

    with pytest.raises(RuntimeError, match="process group"):
        Sharded(_chain())
