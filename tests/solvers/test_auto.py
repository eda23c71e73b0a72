"""method="auto": it probes the methods that apply, races the promising ones against the
sequential loop, solves with the winner, says why, remembers the choice, and gives the
sequential answer whatever it chooses."""

import pytest
import torch

import ffsolve
from ffsolve.problems import FunctionProblem, LinearRecurrenceProblem, Problem
from ffsolve.solvers import get_solver
from ffsolve.solvers.auto import candidates, forget
from systems import chain, dense

D64 = torch.float64


@pytest.fixture(autouse=True)
def fresh():
    forget()
    yield
    forget()


def _linear(T=400, B=2, F=3, gain=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = gain * torch.randn(B, T, F, F, generator=g, dtype=D64) / F**0.5
    b = torch.randn(B, T, F, generator=g, dtype=D64)
    return LinearRecurrenceProblem(A, b)


class Counter(Problem):
    """x_t = x_{t-1} + 1: every method needs T sweeps, and each sweep here is made expensive
    while the stepper is cheap, so the sequential loop must win."""

    def __init__(self, T=64, B=2):
        self.length, self.B = T, B

    def initial(self):
        return torch.zeros(self.B, self.length, dtype=D64)

    def evaluate(self, x, start, stop):
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)[:, start:stop]
        for _ in range(200):  # a heavy sweep
            torch.tanh(x).sum()
        return prev + 1

    def stepper(self, x):
        return lambda t: (x[:, t - 1 : t] + 1) if t else torch.ones_like(x[:, :1])


def test_auto_gives_the_sequential_answer_and_says_why():
    net = dense(T=24)
    x0 = torch.zeros(2, 24, 3, dtype=D64)
    ref = ffsolve.solve(net, x0, method="sequential")
    sol = ffsolve.solve(net, x0, method="auto")
    assert torch.equal(sol.value, ref.value)
    auto = sol.stats["auto"]
    table = auto["candidates"]
    assert auto["choice"] in table and "sequential" in table and "jacobi" in table
    assert auto["tuned"] and auto["actual_s"] > 0 and auto["tuning_s"] > 0
    assert auto["choice"] in auto["reason"] or "no parallel method" in auto["reason"]


def test_candidates_follow_what_the_problem_offers():
    names = lambda p: {s.name for s in candidates(p, get_solver)}  # noqa: E731
    lin = _linear(T=50)
    assert {"scan", "picard", "quasi_newton", "anderson", "jacobi"} <= names(lin)
    fn = FunctionProblem(chain, torch.zeros(2, 50, dtype=D64))
    assert names(fn) == {"jacobi", "gs_jacobi"}  # neither first order (declared) nor linear


class WideChain(Problem):
    """A first-order chain of 200 features with no Jacobians of its own."""

    first_order = True

    def __init__(self, T=20, F=200):
        self.length, self.F = T, F

    def initial(self):
        return torch.zeros(1, self.length, self.F, dtype=D64)

    def evaluate(self, x, start, stop):
        prev = torch.cat([torch.ones_like(x[:, :1]), x[:, :-1]], 1)[:, start:stop]
        return torch.tanh(0.5 * prev)


def test_quasi_newton_is_no_default_candidate_where_its_generic_jacobian_is_too_big():
    names = {s.name for s in candidates(WideChain(), get_solver)}
    assert "picard" in names and "quasi_newton" not in names  # 200 VJPs at once: left out
    assert "quasi_newton" in {s.name for s in candidates(WideChain(F=8), get_solver)}


def test_a_fast_parallel_method_wins_the_race():
    """A strong contraction: Jacobi converges in a few sweeps, the sequential loop of a
    function problem calls the function T times."""
    fn = lambda x: 0.05 * torch.tanh(torch.cumsum(x, 1) - x) + 1  # noqa: E731
    x0 = torch.zeros(4, 300, dtype=D64)
    sol = ffsolve.solve(fn, x0, method="auto")
    auto = sol.stats["auto"]
    assert auto["choice"] != "sequential", auto
    assert auto["candidates"][auto["choice"]]["race"] == "finished"
    assert torch.equal(sol.value, ffsolve.solve(fn, x0, method="sequential").value)


def test_the_sequential_loop_wins_where_every_method_loses():
    p = Counter()
    sol = ffsolve.solve(p, method="auto")
    auto = sol.stats["auto"]
    assert auto["choice"] == "sequential", auto
    assert "no parallel method finished" in auto["reason"]
    raced = [r for r in auto["candidates"].values() if "race" in r]
    assert raced and all(r["race"] != "finished" for r in raced)
    assert torch.equal(sol.value, ffsolve.solve(p, method="sequential").value)


def test_the_choice_is_remembered_and_forgotten():
    p = Counter()
    first = ffsolve.solve(p, method="auto")
    again = ffsolve.solve(p, method="auto")
    assert again.stats["auto"]["tuned"] is False
    assert again.stats["auto"]["choice"] == first.stats["auto"]["choice"]
    assert "tuned earlier" in again.stats["auto"]["reason"]
    assert torch.equal(again.value, first.value)
    assert ffsolve.solve(p, method="auto", retune=True).stats["auto"]["tuned"]
    other = Counter(T=32)  # another shape tunes anew
    assert ffsolve.solve(other, method="auto").stats["auto"]["tuned"]
    forget()
    assert ffsolve.solve(p, method="auto").stats["auto"]["tuned"]


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
    fn = FunctionProblem(chain, torch.zeros(2, 30, dtype=D64))
    sol = ffsolve.solve(fn, method="auto", methods=["newton", "jacobi"])
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
    with pytest.raises(ValueError, match="cannot itself be 'auto'"):
        ffsolve.solve(chain, x0, method="auto", methods=["auto"])
    with pytest.raises(ValueError, match="probe must be"):
        ffsolve.solve(chain, x0, method="auto", probe=0)
    with pytest.raises(TypeError, match="no sweep of its own"):
        ffsolve.solvers.loop.run(get_solver("auto"), FunctionProblem(chain, x0), ffsolve.Stopping())
