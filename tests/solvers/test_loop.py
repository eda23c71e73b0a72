"""The loop's driver: chunked host reads and captured replays return what the plain loop does.

CUDA-graph capture cannot run on the CPU; the captured mode replays the SAME device step as the
eager mode, so here the graph is replaced by an object that replays the step eagerly
(`fake_graphs`), and every other part of the captured driver (chunking, caching in
`problem.graphs`, buffer reset) is tested.
"""

import pytest
import torch

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.models.made import MADE, MADEConfig
from ffsolve.problems.made import MADESampling, logistic_noise
from ffsolve.solvers import loop as loop_module
from systems import chain, dense

D64 = torch.float64


def _same(a, b):
    assert a.num_iters == b.num_iters
    assert torch.equal(a.value, b.value)
    assert torch.equal(a.converged, b.converged)
    for x, y in ((a.residuals, b.residuals), (a.certified, b.certified)):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
    assert a.stats["iters_per_item"] == b.stats["iters_per_item"]


@pytest.mark.parametrize("method,opts", [("jacobi", {}), ("jacobi_gs", {"block_size": 4})])
@pytest.mark.parametrize("check_every", [3, 7, 64])
@pytest.mark.parametrize("atol", [0.0, 1e-6])
def test_chunked_driver_equals_check_every_one(method, opts, check_every, atol):
    model = dense(T=20)
    x0 = torch.zeros(3, 20, 3, dtype=D64)
    with torch.no_grad():
        ref = ffsolve.solve(model, x0, method=method, atol=atol, **opts)
        got = ffsolve.solve(model, x0, method=method, atol=atol, check_every=check_every, **opts)
    _same(got, ref)
    assert got.stats["sweeps_run"] >= got.num_iters
    assert got.num_evals == got.stats["sweeps_run"] * ref.num_evals // ref.num_iters


@pytest.mark.parametrize("check_every", [2, 5])
def test_chunked_budget_and_nan_are_exact(check_every):
    x0 = torch.zeros(2, 30, dtype=D64)
    with pytest.warns(ffsolve.ConvergenceWarning):
        ref = ffsolve.solve(chain, x0, max_iters=7)
    with pytest.warns(ffsolve.ConvergenceWarning):
        got = ffsolve.solve(chain, x0, max_iters=7, check_every=check_every)
    _same(got, ref)

    def blows_up(x):  # position 4 becomes NaN once its input (position 3) is final
        out = chain(x)
        out[:, 4] = torch.where(x[:, 3] > 0.9, torch.nan, out[:, 4])
        return out

    msgs = []
    for ce in (1, check_every):
        with pytest.raises(ffsolve.NonFiniteError) as e:
            ffsolve.solve(blows_up, x0, check_every=ce)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "position 4" in msgs[0]
    n = int(msgs[0].split("iteration ")[1].split(",")[0])
    with pytest.raises(ffsolve.NonFiniteError, match=f"iteration {n}, position 4"):
        ffsolve.solve(blows_up, x0, max_iters=n, check_every=check_every)  # the budget's last


@pytest.mark.parametrize("method,opts", [("jacobi", {}), ("jacobi_gs", {"block_size": 5})])
@pytest.mark.parametrize("record", [True, False])
def test_captured_driver_replays_the_same_step(fake_graphs, method, opts, record):
    made = MADE(MADEConfig(dims=24, hidden=(32, 32), seed=3)).double()
    noise = logistic_noise(4, 24, torch.Generator().manual_seed(0), dtype=D64)
    problem = MADESampling(made, noise, logit_bounds(1e-6))
    with torch.no_grad():
        ref = ffsolve.solve(problem, method=method, record=record, **opts)
        first = ffsolve.solve(problem, method=method, record=record, capture=True, **opts)
        again = ffsolve.solve(problem, method=method, record=record, capture=True, **opts)
    assert again.stats["check_every"] == list(loop_module.DEFAULT_CHUNKS)
    assert first.stats["captured"]
    _same(first, ref)
    _same(again, ref)  # the cached loop, reset and replayed
    (loop,) = problem.graphs.values()
    assert sum(g.replays for g in loop.graphs.values()) >= 1
    # a first chunk of 16 sweeps, then chunks of 4: at most 3 frozen sweeps past 16
    assert again.stats["sweeps_run"] <= max(16, again.num_iters + 3)
    assert again.value.data_ptr() != loop.state.x.data_ptr()  # the caller gets a copy


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("natural", [True, False])
def test_captured_sequential_equals_eager(fake_graphs, incremental, natural):
    made = MADE(MADEConfig(dims=20, hidden=(24, 24), natural_ordering=natural, seed=1)).double()
    noise = logistic_noise(3, 20, torch.Generator().manual_seed(1), dtype=D64)
    problem = MADESampling(made, noise, logit_bounds(1e-6), incremental=incremental)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential")
        got = [ffsolve.solve(problem, method="sequential", capture=True) for _ in range(3)]
    for sol in got:  # the stepper restarts at step 0: every replay gives the same sample
        assert torch.equal(sol.value, ref.value)
        assert sol.stats == {"captured": True}


def test_made_prepared_sweep_is_bitwise_the_plain_one():
    made = MADE(MADEConfig(dims=16, hidden=(20, 20), seed=2)).double()
    noise = logistic_noise(3, 16, torch.Generator().manual_seed(0), dtype=D64)
    problem = MADESampling(made, noise, logit_bounds(1e-6))
    x = torch.randn(3, 16, dtype=D64)
    with torch.no_grad():
        plain = problem.evaluate(x, 0, 16)
        problem.prepare()
        assert torch.equal(problem.evaluate(x, 0, 16), plain)
        made.layers[0].weight.mul_(1.5)  # a weight update: the baked copy is stale
        changed = problem.evaluate(x, 0, 16)  # falls back to the plain path
        problem.prepare()
        assert torch.equal(problem.evaluate(x, 0, 16), changed)
        assert not torch.equal(changed, plain)


def test_capture_option_errors_and_auto_on_cpu():
    x0 = torch.zeros(1, 5, dtype=D64)
    with pytest.raises(ValueError, match="CUDA"):
        ffsolve.solve(chain, x0, capture=True)
    with pytest.raises(ValueError, match="capture must be"):
        ffsolve.solve(chain, x0, capture="yes")
    assert "captured" not in ffsolve.solve(chain, x0).stats  # auto on the CPU: eager
