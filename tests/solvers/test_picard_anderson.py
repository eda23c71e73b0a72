"""picard (ParaDiGMS) and anderson (ParaTAA) in the one loop: the sequential answer on every
problem they apply to, the certificate's bound, windows, tolerance rules and guesses."""

import math

import pytest
import torch

import ffsolve
from exactness import assert_close_to_sequential, parallel_fixed_point
from ffsolve.problems import Problem, RecurrenceForward
from systems import chain, dense

D64 = torch.float64
exactness = pytest.mark.exactness  # also run under another numerical setting (Makefile)


class NoisyChain(Problem):
    """x_t = x_{t-1} + h g(x_{t-1}, t) + s z_t: a sampler-like first-order system."""

    first_order = True

    def __init__(self, T=60, B=2, F=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(F + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, F)
        ).double()
        self.x_T = torch.randn(B, F, generator=g, dtype=D64)
        self.z = torch.randn(B, T, F, generator=g, dtype=D64)
        self.length, self.h, self.s = T, 1.0 / T, 0.3 / math.sqrt(T)

    def initial(self):
        return self.x_T[:, None].expand(-1, self.length, -1).clone()

    def evaluate(self, x, start, stop):
        prev = torch.cat([self.x_T[:, None], x[:, :-1]], 1)[:, start:stop]  # (B, n, F)
        t = torch.linspace(1, 0, self.length, dtype=D64)[start:stop]
        t = t[None, :, None].expand(prev.shape[0], -1, 1)
        return prev + self.h * self.net(torch.cat([prev, t], -1)) + self.s * self.z[:, start:stop]

    def noise_variance(self):
        return torch.full((self.length,), self.s**2, dtype=D64)


def _gru():
    torch.manual_seed(0)
    gru = torch.nn.GRUCell(2, 6).double()
    xs = torch.randn(3, 40, 2, dtype=D64)
    return RecurrenceForward(gru, torch.zeros(3, 6, dtype=D64), xs)


METHODS = [
    ("picard", {}),
    ("picard", {"window": 7}),
    ("anderson", {}),
    ("anderson", {"history": 1}),
    ("anderson", {"history": 4, "window": 9}),
    ("anderson", {"base": "picard"}),
    ("anderson", {"base": "picard", "window": 9, "regularization": 1e-3}),
]


@exactness
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
@pytest.mark.parametrize("make", [NoisyChain, _gru], ids=["sampler", "gru"])
def test_exact_and_within_t_sweeps(make, method, opts):
    problem = make()
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        sol = ffsolve.solve(problem, method=method, **opts)
    if "window" not in opts:  # every sweep evaluates all T steps: their fixed point, bitwise
        assert torch.equal(sol.value, parallel_fixed_point(problem))
    # a window's evaluation and the loop's one step are other shapes: equal to rounding
    assert_close_to_sequential(sol.value, ref, problem.length)
    assert sol.all_converged and sol.num_iters <= problem.length
    cert = sol.certified[:, 0]
    assert bool((cert[1:] >= cert[:-1]).all()) and int(cert[-1]) == problem.length


@exactness
@pytest.mark.parametrize("method,opts", METHODS[2:], ids=[f"{m}{o}" for m, o in METHODS[2:]])
def test_anderson_on_a_dense_function_system_is_bitwise_sequential(method, opts):
    """A function problem's sequential step is the same full-shaped call of the function as a
    sweep (one position kept): the same kernels on the same shapes, so bitwise."""
    opts = {k: v for k, v in opts.items() if k != "base"}  # picard needs first order
    x0 = torch.zeros(2, 20, 3, dtype=D64)
    model = dense(T=20)
    with torch.no_grad():
        ref = ffsolve.solve(model, x0, method="sequential").value
        sol = ffsolve.solve(model, x0, method=method, **opts)
    assert torch.equal(sol.value, ref)


def test_picard_takes_fewer_sweeps_than_jacobi_on_a_sampler():
    """Jacobi on the step form advances about one step per sweep on a sampler; Picard solves
    the identity part exactly and needs far fewer (the ParaDiGMS observation)."""
    problem = NoisyChain(T=80)
    with torch.no_grad():
        jac = ffsolve.solve(problem, method="jacobi")
        pic = ffsolve.solve(problem, method="picard")
        tol = ffsolve.solve(problem, method="picard", atol=0.1, rule="variance")
        ref = ffsolve.solve(problem, method="sequential").value
    assert jac.num_iters >= 0.9 * problem.length  # about one step per sweep
    assert pic.num_iters < 0.8 * jac.num_iters
    assert tol.num_iters < pic.num_iters / 2
    assert (tol.value - ref).abs().max() < 0.1 * problem.s  # within the tolerance's scale


def test_linear_part_and_its_errors():
    class Linear(NoisyChain):
        def linear_part(self, start, stop):
            return torch.full((stop - start, 1), 0.97, dtype=D64)

    problem = Linear(T=30)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        sol = ffsolve.solve(problem, method="picard", linear="problem")
    assert torch.equal(sol.value, parallel_fixed_point(problem))
    assert_close_to_sequential(sol.value, ref, problem.length)
    with pytest.raises(ValueError, match="linear must be"):
        ffsolve.solve(problem, method="picard", linear="nope")
    with pytest.raises(TypeError, match="first-order"):
        ffsolve.solve(chain, torch.zeros(1, 5), method="picard")
    for bad in ({"history": 0}, {"regularization": -1.0}, {"base": "nope"}):
        with pytest.raises((TypeError, ValueError)):
            ffsolve.solve(problem, method="anderson", **bad)


def test_variance_rule_and_guesses():
    with pytest.raises(ValueError, match="rule must be"):
        ffsolve.Stopping(rule="nope")

    class Flat(NoisyChain):
        def noise_variance(self):
            return torch.zeros(self.length)

    with pytest.raises(ValueError, match="noise_variance"):
        ffsolve.solve(Flat(T=10), method="picard", atol=0.1, rule="variance")

    seen = []

    class Guessing(NoisyChain):
        def guess(self, x, window, certified):
            start, stop = window.bounds()  # an eager loop places the window from the host
            seen.append((start, stop, certified.tolist()))
            return torch.full_like(window.take(x), 7.0)  # any guess: exactness is kept

    g = Guessing(T=40)
    with torch.no_grad():
        ref = ffsolve.solve(g, method="sequential").value
        sol = ffsolve.solve(g, method="gs_jacobi", window=8)
    assert_close_to_sequential(sol.value, ref, g.length)  # windows of 8: other shapes
    assert seen and all(min(c) >= s for s, _, c in seen)  # the window starts at certified


class Oscillating(Problem):
    """x_t = tanh(-3 x_{t-1}) + 0.1: bounded, but its Jacobian is far from the identity, so
    Picard's identity linearisation over the whole length grows without bound."""

    first_order = True

    def __init__(self, T=200):
        self.length = T

    def initial(self):
        return torch.zeros(2, self.length)

    def evaluate(self, x, start, stop):
        prev = torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :-1]], 1)[:, start:stop]
        return torch.tanh(-3.0 * prev) + 0.1


@exactness
def test_a_diverging_linearisation_falls_back_to_the_plain_step_and_stays_exact():
    p = Oscillating()
    ref = ffsolve.solve(p, method="sequential").value  # one step of (2, 1): other shapes
    fixed = parallel_fixed_point(p)  # the (2, 200) evaluation's fixed point
    sol = ffsolve.solve(p, method="picard")  # the full-length Picard update grows unboundedly
    assert torch.equal(sol.value, fixed) and sum(sol.stats["picard_fallbacks"]) > 0
    assert_close_to_sequential(sol.value, ref, p.length)
    with pytest.raises(ffsolve.NonFiniteError, match="fallback"):
        ffsolve.solve(p, method="picard", fallback=False)
    loose = ffsolve.solve(p, method="picard", guard=math.inf)  # only non-finite updates
    assert torch.equal(loose.value, fixed)
    window = ffsolve.solve(p, method="picard", window=8).value  # windows of (2, 8)
    assert_close_to_sequential(window, ref, p.length)
    # Anderson's mixing over the same map stays exact, its own safeguard counted too
    sol = ffsolve.solve(p, method="anderson", base="picard")
    assert torch.equal(sol.value, fixed) and len(sol.stats["anderson_fallbacks"]) == 2
    with pytest.raises(ValueError, match="guard"):
        ffsolve.solve(p, method="picard", guard=0.5)
