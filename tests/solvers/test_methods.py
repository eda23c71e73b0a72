import warnings

import pytest
import torch

import ffsolve
from ffsolve.problems import FunctionProblem
from systems import chain, dense

# A function problem's sequential step is the whole function with one position kept: the same
# kernels on the same shapes as a sweep, so these comparisons are bitwise (docs/design.md).
exactness = pytest.mark.exactness  # also run under another numerical setting (Makefile)

PARALLEL = [
    ("jacobi", {}),
    ("jacobi_gs", {"block_size": 7}),
    ("jacobi_gs", {}),
    ("gs_jacobi", {"block_size": 6}),
    ("gs_jacobi", {"window": 9}),
    ("gs_jacobi", {}),
]


def ids(p):
    return f"{p[0]}-{'-'.join(f'{k}{v}' for k, v in p[1].items())}"


@exactness
@pytest.mark.parametrize("method,opts", PARALLEL, ids=[ids(p) for p in PARALLEL])
@pytest.mark.parametrize("batch", [1, 3])
def test_dense_equals_sequential(method, opts, batch):
    model = dense()
    x0 = torch.randn(batch, 40, 3, dtype=torch.float64)
    ref = ffsolve.solve(model, x0, method="sequential")
    sol = ffsolve.solve(model, x0, method=method, **opts)
    assert sol.all_converged
    assert torch.equal(sol.value, ref.value)
    # and the reference really is the fixed point computed position by position
    assert torch.equal(model(ref.value)[:, 1:], ref.value[:, 1:])


@exactness
@pytest.mark.parametrize("method,opts", PARALLEL, ids=[ids(p) for p in PARALLEL])
def test_chain_equals_sequential(method, opts):
    x0 = torch.zeros(2, 50, dtype=torch.float64)
    ref = ffsolve.solve(chain, x0, method="sequential")
    sol = ffsolve.solve(chain, x0, method=method, **opts)
    assert torch.equal(sol.value, ref.value)
    # a chain is the worst case: nothing converges early
    if method == "jacobi":
        assert sol.num_iters == 50


@exactness
@pytest.mark.parametrize("method,opts", PARALLEL, ids=[ids(p) for p in PARALLEL])
@pytest.mark.parametrize("dim", [0, 2, -1])
def test_other_dims(method, opts, dim):
    model = dense(T=20, C=2)
    shape = {0: (20, 3, 2), 2: (3, 2, 20), -1: (3, 2, 20)}[dim]
    d = dim % 3
    x0 = torch.randn(shape, dtype=torch.float64)

    def fn(x):  # positions along d, batch and features elsewhere
        y = x.movedim(d, 0).reshape(20, -1, 2).transpose(0, 1)  # (B', T, C)
        out = model(y).transpose(0, 1).reshape(x.movedim(d, 0).shape)
        return out.movedim(0, d)

    ref = ffsolve.solve(fn, x0, method="sequential", dim=dim)
    sol = ffsolve.solve(fn, x0, method=method, dim=dim, **opts)
    assert torch.equal(sol.value, ref.value)
    assert sol.value.shape == x0.shape


def test_jacobi_bounds_and_certificate():
    model = dense(T=30, gain=3.0)
    x0 = torch.randn(4, 30, 3, dtype=torch.float64)
    sol = ffsolve.solve(model, x0, method="jacobi")
    assert sol.num_iters <= 30
    cert = sol.certified  # (iters, B)
    assert cert.shape == (sol.num_iters, 4)
    assert sol.residuals.shape == (sol.num_iters, 4)
    steps = cert[1:] - cert[:-1]
    assert bool((steps[(cert[:-1] < 30)] >= 1).all()), "certified prefix must grow every iteration"
    assert bool((cert[0] >= 1).all())
    assert bool((cert[-1] == 30).all())


def test_jacobi_gs_within_number_of_blocks():
    x0 = torch.zeros(1, 50, dtype=torch.float64)
    for K in (1, 5, 7, 50):
        sol = ffsolve.solve(chain, x0, method="jacobi_gs", block_size=K)
        assert sol.num_iters <= -(-50 // K)
        assert sol.num_evals == K * sol.num_iters
        assert sol.all_converged


def test_limits_coincide():
    """jacobi = jacobi_gs(1) = gs_jacobi(one block); sequential = gs_jacobi(blocks of 1)."""
    model = dense(T=25)
    x0 = torch.randn(2, 25, 3, dtype=torch.float64)
    a = ffsolve.solve(model, x0, method="jacobi")
    b = ffsolve.solve(model, x0, method="jacobi_gs", block_size=1)
    c = ffsolve.solve(model, x0, method="gs_jacobi", block_size=25)
    d = ffsolve.solve(model, x0, method="gs_jacobi", block_size=1)
    assert a.num_iters == b.num_iters == c.num_iters
    assert torch.equal(a.residuals, b.residuals) and torch.equal(a.residuals, c.residuals)
    assert torch.equal(a.value, d.value)
    e = ffsolve.solve(model, x0, method="jacobi_gs", block_size=25)
    assert e.num_iters == 1 and e.num_evals == 25


def test_record_consistency_and_num_evals_counts_real_calls():
    model = dense(T=24)
    calls = []

    def fn(x):
        calls.append(1)
        return model(x)

    x0 = torch.randn(2, 24, 3, dtype=torch.float64)
    for method, opts in [("sequential", {}), *PARALLEL]:
        calls.clear()
        sol = ffsolve.solve(fn, x0, method=method, **opts)
        assert sol.num_evals == len(calls), method
        assert sol.converged.shape == (2,)
        if method != "sequential":
            assert len(sol.residuals) == sol.num_iters
            assert len(sol.certified) == sol.num_iters
            assert sol.residuals[-1].max() >= 0
        assert sol.value.dtype == x0.dtype


def test_record_off():
    model = dense(T=24)
    x0 = torch.randn(2, 24, 3, dtype=torch.float64)
    sol = ffsolve.solve(model, x0, method="jacobi", record=False)
    assert sol.residuals is None and sol.certified is None
    assert sol.all_converged


@pytest.mark.parametrize("check_every", [2, 5, 100])
def test_check_every_keeps_exact_count(check_every):
    model = dense(T=40, gain=3.0)
    x0 = torch.randn(3, 40, 3, dtype=torch.float64)
    a = ffsolve.solve(model, x0, method="jacobi")
    b = ffsolve.solve(model, x0, method="jacobi", check_every=check_every)
    assert a.num_iters == b.num_iters
    assert torch.equal(a.value, b.value)
    assert b.num_evals >= b.num_iters


@pytest.mark.parametrize("chunks", [(8, 2), (1, 3), (64, 4)])
def test_check_every_pair_reads_a_first_chunk_then_smaller_ones(chunks):
    """check_every=(first, then): same answer, count and traces; the sweeps run (frozen ones
    included) follow the schedule, so the waste past convergence is below `then`."""
    model = dense(T=40, gain=3.0)
    x0 = torch.randn(3, 40, 3, dtype=torch.float64)
    a = ffsolve.solve(model, x0, method="jacobi")
    b = ffsolve.solve(model, x0, method="jacobi", check_every=chunks)
    assert a.num_iters == b.num_iters and torch.equal(a.value, b.value)
    assert torch.equal(a.residuals, b.residuals) and torch.equal(a.certified, b.certified)
    first, then = chunks
    n = a.num_iters
    expected = min(first, 40) if n <= first else first + then * -(-(n - first) // then)
    assert b.stats["sweeps_run"] == expected and b.stats["check_every"] == list(chunks)
    assert 0 <= b.stats["sweeps_run"] - n < (then if n > first else first)
    for bad, err in (((8,), ValueError), ((8, 0), ValueError), ([8, 2], TypeError)):
        with pytest.raises(err, match="check_every"):
            ffsolve.solve(model, x0, method="jacobi", check_every=bad)


def test_tolerance_stops_earlier_and_is_close():
    model = dense(T=40, gain=3.0)
    x0 = torch.randn(3, 40, 3, dtype=torch.float64)
    exact = ffsolve.solve(model, x0, method="jacobi")
    loose = ffsolve.solve(model, x0, method="jacobi", atol=1e-3)
    assert loose.num_iters <= exact.num_iters
    assert (loose.value - exact.value).abs().max() < 0.1


def test_float32_and_per_item_iters():
    model = dense(T=32).float()
    x0 = torch.randn(5, 32, 3)
    ref = ffsolve.solve(model, x0, method="sequential")
    sol = ffsolve.solve(model, x0, method="jacobi")
    assert sol.value.dtype == torch.float32
    assert torch.allclose(sol.value, ref.value, atol=1e-5)
    per_item = sol.stats["iters_per_item"]
    assert len(per_item) == 5 and max(per_item) == sol.num_iters


def test_max_iters_warns_and_raises():
    x0 = torch.zeros(2, 30, dtype=torch.float64)
    with pytest.warns(ffsolve.ConvergenceWarning, match="max_iters=5"):
        sol = ffsolve.solve(chain, x0, method="jacobi", max_iters=5)
    assert not sol.converged.any()
    assert sol.num_iters == 5
    with pytest.raises(ffsolve.ConvergenceError):
        ffsolve.solve(chain, x0, method="jacobi", max_iters=5, raise_on_failure=True)
    # exactness bound: T iterations need no confirming sweep
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = ffsolve.solve(chain, x0, method="jacobi", max_iters=30)
    assert sol.all_converged and sol.num_iters == 30


def test_problem_object_and_solver_object():
    model = dense(T=16)
    x0 = torch.randn(2, 16, 3, dtype=torch.float64)
    problem = FunctionProblem(model, x0)
    solver = ffsolve.get_solver("gs_jacobi", window=4)
    a = ffsolve.solve(problem, method=solver)
    b = ffsolve.solve(model, x0, method="sequential")
    assert torch.equal(a.value, b.value)


def test_initial_guess_is_not_modified():
    model = dense(T=16)
    x0 = torch.randn(2, 16, 3, dtype=torch.float64)
    keep = x0.clone()
    ffsolve.solve(model, x0, method="jacobi")
    assert torch.equal(x0, keep)
