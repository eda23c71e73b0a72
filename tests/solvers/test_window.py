"""Windows that move on the device, per-solve memory owned by the loop, the capture policy.

A window narrower than T moves with the certified prefix. Where the loop is captured (or the
problem gathers a window by a device offset, `window_on_device`), the window's start is a
device tensor computed inside the step, so chunks of sweeps replay with one host read; an
eager loop over a problem without it places the window from the host after every sweep. Both
must give the same solve: the same value, counts, traces and memory. CUDA graphs cannot run on
the CPU: `fake_graphs` replays the same recorded step eagerly.
"""

import warnings

import pytest
import torch
from test_picard_anderson import NoisyChain, Oscillating

import ffsolve
from ffsolve import graphs
from ffsolve.data import logit_bounds
from ffsolve.models.made import MADE, MADEConfig
from ffsolve.problems.made import MADESampling, logistic_noise

D64 = torch.float64

WINDOW_METHODS = [
    ("gs_jacobi", {"window": 7}),
    ("gs_jacobi", {"block_size": 6}),
    ("picard", {"window": 7}),
    ("anderson", {"window": 9}),
    ("anderson", {"base": "picard", "window": 9, "history": 2}),
]


class DeviceChain(NoisyChain):
    """NoisyChain with its window gathered by a device offset (as DiffusionSampling does)."""

    window_on_device = True

    def evaluate_window(self, x, start, width):
        index = torch.arange(width) + start  # (n,)
        prev = torch.cat([self.x_T[:, None], x[:, :-1]], 1).index_select(1, index)
        t = torch.linspace(1, 0, self.length, dtype=D64).index_select(0, index)
        t = t[None, :, None].expand(prev.shape[0], -1, 1)
        z = self.z.index_select(1, index)
        return prev + self.h * self.net(torch.cat([prev, t], -1)) + self.s * z


def _same_solve(a, b):
    assert a.num_iters == b.num_iters
    assert torch.equal(a.value, b.value)
    assert torch.equal(a.converged, b.converged)
    assert a.stats["iters_per_item"] == b.stats["iters_per_item"]
    assert torch.equal(a.residuals, b.residuals)
    assert torch.equal(a.certified, b.certified)
    for name in ("picard_fallbacks", "anderson_fallbacks"):
        assert a.stats.get(name) == b.stats.get(name)


@pytest.mark.parametrize("method,opts", WINDOW_METHODS)
@pytest.mark.parametrize("atol", [0.0, 1e-8])
def test_a_window_on_the_device_is_the_window_on_the_host(method, opts, atol):
    host, dev = NoisyChain(T=50), DeviceChain(T=50)
    dev.net.load_state_dict(host.net.state_dict())  # the same system
    with torch.no_grad():
        ref = ffsolve.solve(host, method=method, atol=atol, **opts)
        got = ffsolve.solve(dev, method=method, atol=atol, **opts)
        chunked = ffsolve.solve(dev, method=method, atol=atol, check_every=6, **opts)
        seq = ffsolve.solve(host, method="sequential").value
    _same_solve(got, ref)
    _same_solve(chunked, ref)  # chunks of 6 sweeps, frozen past the end: nothing changes
    assert chunked.stats["sweeps_run"] >= chunked.num_iters
    assert ref.all_converged
    if atol == 0:  # the same shapes as the sequential loop's steps here: float64, one MLP
        torch.testing.assert_close(ref.value, seq, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,opts", WINDOW_METHODS)
def test_captured_moving_windows_replay_the_eager_solve(fake_graphs, method, opts):
    """A moving window is no obstacle to capture any more: the captured loop equals the
    eager one, and a second solve replays the cached graphs on reset buffers and memory."""
    problem = DeviceChain(T=45)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method=method, **opts)
        first = ffsolve.solve(problem, method=method, capture=True, **opts)
        again = ffsolve.solve(problem, method=method, capture=True, **opts)
    assert first.stats["captured"] and again.stats["captured"]
    _same_solve(first, ref)
    _same_solve(again, ref)
    (loop,) = problem.graphs.values()
    assert sum(g.replays for g in loop.graphs.values()) >= 1


@pytest.mark.parametrize("method,opts", WINDOW_METHODS[::2])
def test_the_generic_window_evaluates_everything_and_gathers(fake_graphs, method, opts):
    """Without its own `evaluate_window`, a captured window method evaluates every position
    and gathers the window: other shapes than the eager window's `evaluate`, so the two agree
    to rounding (float64 here), not bitwise."""
    problem = NoisyChain(T=45)
    x = torch.randn(2, 45, 5, dtype=D64)
    with torch.no_grad():
        gathered = problem.evaluate_window(x, torch.tensor(11), 9)
        torch.testing.assert_close(gathered, problem.evaluate(x, 11, 20), rtol=1e-13, atol=0)
        ref = ffsolve.solve(problem, method=method, **opts)
        got = ffsolve.solve(problem, method=method, capture=True, **opts)
    assert got.stats["captured"] and got.all_converged
    torch.testing.assert_close(got.value, ref.value, rtol=1e-12, atol=1e-12)


def test_gs_jacobi_window_on_made_is_captured(fake_graphs):
    made = MADE(MADEConfig(dims=30, hidden=(32, 32), seed=3)).double()
    noise = logistic_noise(3, 30, torch.Generator().manual_seed(0), dtype=D64)
    problem = MADESampling(made, noise, logit_bounds(1e-6))
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="gs_jacobi", window=8)
        got = ffsolve.solve(problem, method="gs_jacobi", window=8, capture=True)
    assert got.stats["captured"]
    _same_solve(got, ref)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_fallback_counts_do_not_depend_on_check_every(method):
    """The safeguard's counts are memory the loop freezes with the iterate: a frozen sweep
    past the budget counts nothing (before, Picard reported [930, 919] at check_every=1 and
    [1422, 1411] at 16)."""
    problem = Oscillating(T=200)
    opts = {"base": "picard"} if method == "anderson" else {}
    counts = []
    for every in (1, 3, 16):
        with torch.no_grad(), pytest.warns(ffsolve.ConvergenceWarning):
            sol = ffsolve.solve(problem, method=method, max_iters=20, check_every=every, **opts)
        counts.append(sol.stats[f"{method}_fallbacks"])
    assert sum(counts[0]) > 0  # the safeguard did act
    assert counts[0] == counts[1] == counts[2]


def test_a_capture_is_keyed_by_the_stopping_rule(fake_graphs):
    """A loop captured under rule='variance' is not replayed for rule='elementwise' (it was:
    the key left the rule out, and the second solve stopped where the first did)."""
    problem = NoisyChain(T=30)
    got, ref = {}, {}
    with torch.no_grad():
        for rule in ("variance", "elementwise"):
            got[rule] = ffsolve.solve(problem, method="jacobi", atol=0.5, rule=rule, capture=True)
            ref[rule] = ffsolve.solve(problem, method="jacobi", atol=0.5, rule=rule)
    assert ref["variance"].num_iters != ref["elementwise"].num_iters  # the rule matters here
    for rule in got:
        _same_solve(got[rule], ref[rule])
    assert len(problem.graphs) == 2


def test_a_failed_capture_warns_once_and_runs_eagerly(fake_graphs, monkeypatch):
    """The one capture policy: a recording that fails after its warm-up warns once, the solve
    goes on uncaptured with the same answer, and the record says why."""
    calls = []

    def failing(body, times=1, warmup=None):
        for _ in range(times if warmup is None else warmup):
            body()  # the warm-up is real work
        calls.append(times)
        raise graphs.CaptureError("OutOfMemoryError: CUDA out of memory (test)")

    monkeypatch.setattr(graphs, "capture", failing)
    monkeypatch.setattr(graphs, "_WARNED", set())
    problem = NoisyChain(T=40)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="picard", window=8)
        with pytest.warns(graphs.CaptureWarning, match="out of memory"):
            got = ffsolve.solve(problem, method="picard", window=8, capture=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: not again
            again = ffsolve.solve(problem, method="picard", window=8, capture=True)
        assert calls == [16]  # the first chunk's; the cached loop does not try again
        with pytest.warns(graphs.CaptureWarning, match="sequential"):
            seq = ffsolve.solve(problem, method="sequential", capture=True)
    for sol in (got, again):
        assert sol.stats["captured"] is False
        assert "out of memory" in sol.stats["capture_failed"]
        assert torch.equal(sol.value, ref.value) and sol.num_iters == ref.num_iters
    assert seq.stats.get("capture_failed")  # the direct path keeps the same policy
    torch.testing.assert_close(seq.value, ref.value, rtol=0, atol=1e-12)


def test_an_error_of_the_warm_up_is_the_works_own(fake_graphs):
    def broken(x):
        raise RuntimeError("the model broke")

    with pytest.raises(RuntimeError, match="the model broke"):
        ffsolve.solve(broken, torch.zeros(1, 5, dtype=D64), capture=True)


def test_window_wider_than_the_sequence_is_the_whole_sequence():
    problem = NoisyChain(T=12)
    with torch.no_grad():
        wide = ffsolve.solve(problem, method="picard", window=100)
        full = ffsolve.solve(problem, method="picard")
    _same_solve(wide, full)
