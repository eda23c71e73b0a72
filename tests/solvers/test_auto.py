"""method="auto": it probes the methods that apply, predicts each one's cost, solves with the
cheapest, says why, and gives the sequential answer whatever it chooses."""

import pytest
import torch

import ffsolve
from ffsolve.problems import LinearRecurrenceProblem
from ffsolve.solvers import get_solver
from ffsolve.solvers.auto import candidates
from systems import chain, dense

D64 = torch.float64


def _linear(T=400, B=2, F=3, gain=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = gain * torch.randn(B, T, F, F, generator=g, dtype=D64) / F**0.5
    b = torch.randn(B, T, F, generator=g, dtype=D64)
    return LinearRecurrenceProblem(A, b)


def test_auto_gives_the_sequential_answer_and_says_why():
    net = dense(T=24)
    x0 = torch.zeros(2, 24, 3, dtype=D64)
    ref = ffsolve.solve(net, x0, method="sequential")
    sol = ffsolve.solve(net, x0, method="auto")
    assert torch.equal(sol.value, ref.value)
    auto = sol.stats["auto"]
    table = auto["candidates"]
    assert auto["choice"] in table and "sequential" in table and "jacobi" in table
    assert auto["predicted_s"] == min(
        v["predicted_s"] for v in table.values() if "predicted_s" in v
    )
    assert auto["actual_s"] > 0 and auto["choice"] in auto["reason"]


def test_candidates_follow_what_the_problem_offers():
    names = lambda p: {s.name for s in candidates(p, get_solver)}  # noqa: E731
    lin = _linear(T=50)
    assert {"scan", "picard", "quasi_newton", "anderson", "jacobi"} <= names(lin)
    fn = ffsolve.problems.FunctionProblem(chain, torch.zeros(2, 50, dtype=D64))
    assert names(fn) == {"jacobi", "gs_jacobi"}  # neither first order (declared) nor linear


def test_auto_on_a_linear_recurrence_is_exact_within_the_tolerance():
    p = _linear()
    ref = ffsolve.solve(p, method="sequential")
    sol = ffsolve.solve(p, method="auto", atol=1e-9)
    assert sol.all_converged
    torch.testing.assert_close(sol.value, ref.value, atol=1e-8, rtol=0)


def test_a_contraction_is_predicted_from_its_shrinking_change():
    """A contractive system certifies nothing for many sweeps, then everything: the prefix
    alone would predict T sweeps; the geometric estimate must land near the real count."""
    p = _linear(T=400, gain=0.3)
    sol = ffsolve.solve(p, method="auto", methods=["jacobi"], atol=1e-9, probe=4)
    row = sol.stats["auto"]["candidates"]["jacobi"]
    assert row["by"] == "contraction"
    actual = ffsolve.solve(p, method="jacobi", atol=1e-9).num_iters
    assert actual / 2 <= row["sweeps"] <= actual * 2, (row, actual)


def test_a_candidate_that_cannot_run_is_skipped_with_its_reason():
    fn = ffsolve.problems.FunctionProblem(chain, torch.zeros(2, 30, dtype=D64))
    sol = ffsolve.solve(fn, method="auto", methods=["newton", "jacobi"])
    assert "skipped" in sol.stats["auto"]["candidates"]["newton"]
    assert "first-order" in sol.stats["auto"]["candidates"]["newton"]["skipped"]
    ref = ffsolve.solve(fn, method="sequential")
    assert torch.equal(sol.value, ref.value)


def test_the_callback_sees_the_chosen_solve():
    x0 = torch.zeros(1, 12, dtype=D64)
    seen = []
    sol = ffsolve.solve(chain, x0, method="auto", callback=lambda k, x: seen.append(x.clone()))
    assert seen and torch.equal(seen[-1], sol.value)


def test_auto_options_are_checked():
    x0 = torch.zeros(1, 8, dtype=D64)
    with pytest.raises(TypeError, match="auto.*does not take window"):
        ffsolve.solve(chain, x0, method="auto", window=3)
    with pytest.raises(ValueError, match="auto"):
        get_solver("auto")
