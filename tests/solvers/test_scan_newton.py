"""scan on linear recurrences, Newton and quasi-Newton on RNN/GRU/LSTM cells, scan gradients
through backprop_through, and the safeguards (divergence reported, NaN located)."""

import warnings

import pytest
import torch

import ffsolve
from exactness import (
    assert_close_to_sequential,
    parallel_fixed_point,
    sequential_tolerance,
)
from ffsolve.problems import LinearRecurrenceProblem, RecurrenceForward
from ffsolve.solvers import Stopping
from ffsolve.solvers.newton import QuasiNewton

D64 = torch.float64
exactness = pytest.mark.exactness  # also run under another numerical setting (Makefile)


def _loop(A, b, h0=None):
    """The plain sequential loop x_t = A_t x_{t-1} + b_t (the reference)."""
    x = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        x = (A[:, t] * x if A.dim() == 3 else (A[:, t] @ x[..., None])[..., 0]) + b[:, t]
        out.append(x)
    return torch.stack(out, 1)


@exactness
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("B,T,F", [(1, 1, 3), (2, 7, 4), (3, 37, 2)])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_scan_equals_the_sequential_loop(dense, B, T, F, chunk):
    g = torch.Generator().manual_seed(T * 10 + F)
    A = (
        torch.randn(B, T, F, F, dtype=D64, generator=g) / F**0.5
        if dense
        else torch.rand(B, T, F, dtype=D64, generator=g) * 1.5
    )
    b = torch.randn(B, T, F, dtype=D64, generator=g)
    h0 = torch.randn(B, F, dtype=D64, generator=g)
    ref = _loop(A, b, h0)
    torch.testing.assert_close(
        ffsolve.linear_scan(A, b, h0, chunk=chunk), ref, rtol=1e-12, atol=1e-12
    )
    problem = LinearRecurrenceProblem(A, b)
    seq = ffsolve.solve(problem, method="sequential").value
    torch.testing.assert_close(seq, _loop(A, b))
    sol = ffsolve.solve(problem, method="scan", chunk=chunk)
    torch.testing.assert_close(sol.value, seq, rtol=1e-12, atol=1e-12)
    assert sol.num_iters == 1 and sol.all_converged


def test_scan_is_one_direct_sweep_with_its_record_and_a_located_nan():
    """scan skips the iteration bookkeeping: one sweep, every position certified, the change
    from the start as its one-row trace; NaN in the result names iteration 1 and the step."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 11, 3, 3, dtype=D64, generator=g) / 3
    b = torch.randn(2, 11, 3, dtype=D64, generator=g)
    seen = []
    sol = ffsolve.solve(
        LinearRecurrenceProblem(A, b), method="scan", callback=lambda k, x: seen.append(k)
    )
    assert sol.num_iters == 1 and sol.num_evals == 1 and seen == [1]
    assert sol.converged.tolist() == [True, True] and sol.stats["iters_per_item"] == [1, 1]
    assert sol.certified.tolist() == [[11, 11]]
    torch.testing.assert_close(sol.residuals[0], _loop(A, b).abs().amax(dim=(1, 2)))
    quiet = ffsolve.solve(LinearRecurrenceProblem(A, b), method="scan", record=False)
    assert quiet.residuals is None
    assert sol.stats["capture_chunks"] is True  # a graph per small chunk shape (CPU: eager)
    with pytest.raises(TypeError, match="capture_chunks must be True or False"):
        ffsolve.solve(LinearRecurrenceProblem(A, b), method="scan", capture_chunks="yes")
    b[1, 6, 2] = float("nan")
    with pytest.raises(ValueError, match=r"b holds NaN or Inf \(first at index \(1, 6, 2\)\)"):
        LinearRecurrenceProblem(A, b)  # bad input: refused before any solve
    with pytest.raises(ValueError, match="b holds NaN"):
        ffsolve.linear_scan(A, b)
    b[1, 6, 2] = 0.0
    A[1, 6:8] = 1e200  # finite input whose solution overflows at position 7
    with pytest.raises(ffsolve.NonFiniteError, match="iteration 1, position 7"):
        ffsolve.solve(LinearRecurrenceProblem(A, b), method="scan", record=False)


def test_scan_matvec_kind_and_errors():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 9, 3, 3, dtype=D64, generator=g) / 2
    b = torch.randn(2, 9, 3, dtype=D64, generator=g)
    rec = ffsolve.problems.LinearRecurrence(
        b, lambda s, e: lambda v: (A[:, s:e] @ v[..., None])[..., 0], "matvec"
    )
    from ffsolve.solvers.scan import affine_scan

    torch.testing.assert_close(affine_scan(rec, chunk=4), _loop(A, b))
    fn = ffsolve.FunctionProblem(lambda x: x.cumsum(1), torch.zeros(1, 4, 1))
    with pytest.raises(TypeError, match="not a linear recurrence"):
        ffsolve.solve(fn, method="scan")
    with pytest.raises(TypeError, match="first-order"):
        ffsolve.solve(fn, method="newton")
    with pytest.raises(ValueError, match="damping"):
        ffsolve.solve(LinearRecurrenceProblem(A, b), method="newton", damping=2.0)
    with pytest.raises(ValueError, match="b must be"):
        ffsolve.linear_scan(A[:, :, 0], b[:, :3])


def _cell(kind, B=3):
    g = torch.Generator().manual_seed(1)
    if kind == "rnn":
        return torch.nn.RNNCell(2, 6).to(D64), torch.randn(B, 6, dtype=D64, generator=g)
    if kind == "gru":
        return torch.nn.GRUCell(2, 6).to(D64), torch.randn(B, 6, dtype=D64, generator=g)
    if kind == "vanilla":  # a model's bound step with its own step_jacobian (the paper's RNN)
        from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

        rnn = VanillaRNN(VanillaRNNConfig(hidden=6, input_size=2, seed=1)).to(D64)
        return rnn.step, torch.randn(B, 6, dtype=D64, generator=g)
    h0 = (torch.randn(B, 5, dtype=D64, generator=g), torch.randn(B, 5, dtype=D64, generator=g))
    return torch.nn.LSTMCell(2, 5).to(D64), h0


def _unroll(cell, h0, xs):
    h, out = h0, []
    for t in range(xs.shape[1]):
        h = cell(xs[:, t], h)
        out.append(torch.cat(h, -1) if isinstance(h, tuple) else h)
    return torch.stack(out, 1)


@exactness
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
def test_newton_converges_to_the_sequential_states_within_T(kind, method):
    cell, h0 = _cell(kind)
    T = 23
    xs = torch.randn(3, T, 2, dtype=D64, generator=torch.Generator().manual_seed(2))
    problem = RecurrenceForward(cell, h0, xs)
    seq = ffsolve.solve(problem, method="sequential").value
    with torch.no_grad():
        torch.testing.assert_close(seq, _unroll(cell, h0, xs), rtol=0, atol=1e-15)
    fixed = parallel_fixed_point(problem)  # the cell on all B*T rows at once, to its fixed point
    jac = ffsolve.solve(problem, method="jacobi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on a well-behaved cell
        sol = ffsolve.solve(problem, method=method, chunk=7)
    assert sol.all_converged and sol.num_iters <= T
    # the bitwise fixed point of the batched cell, the same as Jacobi's: exact, not close
    assert torch.equal(sol.value, fixed) and torch.equal(jac.value, fixed)
    # the loop runs the cell on B rows a step: other shapes, equal to rounding (tests/exactness)
    assert_close_to_sequential(sol.value, seq, T)
    hs = problem.states(sol.value)
    assert isinstance(hs, tuple) == (kind == "lstm")
    assert sol.residuals.shape == (sol.num_iters, 3) and sol.num_evals == 2 * sol.num_iters


@exactness
@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
def test_newton_never_certifies_a_wrong_prefix(method):
    """Every iterate's certified prefix is, bitwise, the fixed point of the parallel evaluation
    (what the certificate proves), and the sequential states to rounding; one position past
    the prefix the early iterates are still really wrong, so the check has something to catch."""
    cell, h0 = _cell("rnn", B=2)
    T = 19
    xs = torch.randn(2, T, 2, dtype=D64, generator=torch.Generator().manual_seed(3))
    problem = RecurrenceForward(cell, h0, xs)
    seq = ffsolve.solve(problem, method="sequential").value
    fixed = parallel_fixed_point(problem)
    iterates = []
    sol = ffsolve.solve(
        problem, method=method, damping=0.3, callback=lambda k, x: iterates.append(x.clone())
    )
    assert len(iterates) == sol.num_iters <= T
    tol = sequential_tolerance(D64, T)
    uncertified_wrong = 0
    for x, cert in zip(iterates, sol.certified, strict=True):
        for b in range(2):
            c = int(cert[b])
            assert c >= 1 and torch.equal(x[b, :c], fixed[b, :c])
            assert_close_to_sequential(x[b, :c], seq[b, :c], T)
            if c < T:  # the first uncertified position: not final yet, off by more than rounding
                uncertified_wrong += bool((x[b, c] - fixed[b, c]).abs().max() > 1e6 * tol)
    assert uncertified_wrong >= 1


@exactness
def test_newton_on_a_linear_recurrence_is_one_scan_then_polish():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 30, 3, 3, dtype=D64, generator=g) / 3
    b = torch.randn(2, 30, 3, dtype=D64, generator=g)
    problem = LinearRecurrenceProblem(A, b)
    sol = ffsolve.solve(problem, method="newton", record=True)
    assert sol.stats["newton_residual"][1] < 1e-12  # exact after one Newton step
    # polished to the fixed point of the batched matmul (all T at once) bitwise; the loop's
    # one-step matmuls are other shapes: equal to rounding
    assert torch.equal(sol.value, parallel_fixed_point(problem))
    seq = ffsolve.solve(problem, method="sequential").value
    assert_close_to_sequential(sol.value, seq, problem.length)


def test_scan_gradients_equal_autograd():
    for kind in ("rnn", "gru", "lstm"):
        cell, h0 = _cell(kind, B=2)
        xs = torch.randn(2, 13, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
        xs.requires_grad_()
        grads = {}
        for method, opts in (("sequential", {}), ("scan", {"chunk": 5})):
            cell.zero_grad()
            xs.grad = None
            hs, info = ffsolve.backprop_through(cell, h0, xs, method=method, **opts)
            hh = torch.cat(hs, -1) if isinstance(hs, tuple) else hs
            (hh.sin() * torch.arange(13, dtype=D64)[:, None]).sum().backward()
            grads[method] = torch.cat(
                [p.grad.flatten() for p in cell.parameters()] + [xs.grad.flatten()]
            )
        assert info.num_iters == 1 and info.converged
        torch.testing.assert_close(grads["scan"], grads["sequential"], rtol=1e-12, atol=1e-12)


def _expanding(h, x):
    return 4.0 * torch.sin(3.0 * h) + x  # |J| up to 12: Newton's linear steps blow up


@exactness
def test_diverging_newton_is_reported():
    h0 = torch.zeros(1, 1)
    xs = torch.randn(1, 60, 1, generator=torch.Generator().manual_seed(6))
    problem = RecurrenceForward(_expanding, h0, xs)
    seq = ffsolve.solve(problem, method="sequential").value
    with pytest.warns(ffsolve.DivergenceWarning, match="Jacobi steps were taken"):
        sol = ffsolve.solve(problem, method="newton")
    assert sum(sol.stats["newton_fallbacks"]) + sum(sol.stats["newton_nonfinite"]) > 0
    assert sol.all_converged and torch.equal(
        sol.value, ffsolve.solve(problem, method="jacobi").value
    )
    torch.testing.assert_close(sol.value, seq)
    with pytest.raises(ffsolve.NonFiniteError, match=r"iteration \d+, position \d+"):
        ffsolve.solve(problem, method="newton", fallback=False)


def test_nan_in_an_iterate_names_iteration_and_time_step():
    def cell(h, x):
        return torch.where(x > 0.5, torch.full_like(h, float("nan")), torch.tanh(h + x))

    xs = torch.zeros(1, 12, 1)
    xs[0, 7] = 1.0
    problem = RecurrenceForward(cell, torch.zeros(1, 1), xs)
    for method in ("newton", "quasi_newton", "jacobi"):
        with pytest.raises(ffsolve.NonFiniteError, match="iteration 1, position 7"):
            ffsolve.solve(problem, method=method, fallback=False) if method != "jacobi" else (
                ffsolve.solve(problem, method=method)
            )


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm", "vanilla"])
def test_closed_form_cell_jacobians_equal_autograd(kind):
    from ffsolve.problems.recurrence import _cell_jacobians, torch_cell_jacobian

    cell, h0 = _cell(kind, B=4)
    problem = RecurrenceForward(cell, h0, torch.randn(4, 3, 2, dtype=D64))
    h = torch.randn(4, problem.shape[2], dtype=D64)
    x = torch.randn(4, 2, dtype=D64)
    ref = _cell_jacobians(problem.cell, h, x, False)  # (4, F, F) by autograd
    jac = torch_cell_jacobian(cell)
    torch.testing.assert_close(jac(h, x, False), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        jac(h, x, True), ref.diagonal(dim1=1, dim2=2), rtol=1e-12, atol=1e-14
    )


def test_generic_jacobians_of_a_first_order_function_problem():
    """The Problem default (batched VJPs of evaluate) on a plain function declared first-order."""
    W = torch.randn(3, 3, dtype=D64) / 2

    def fn(x):  # x (B, T, 3): f_t = tanh(W x_{t-1}) + 1
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        return torch.tanh(prev @ W.T) + 1

    problem = ffsolve.FunctionProblem(fn, torch.zeros(2, 9, 3, dtype=D64))
    problem.first_order = True
    seq = ffsolve.solve(problem, method="sequential").value
    for method in ("newton", "quasi_newton"):
        sol = ffsolve.solve(problem, method=method, chunk=4)
        assert sol.all_converged and sol.num_iters <= 9
        torch.testing.assert_close(sol.value, seq, rtol=0, atol=1e-15)
    x = torch.randn(2, 9, 3, dtype=D64)
    J = problem.jacobians(x, 2, 6)  # (2, 4, 3, 3)
    ref = (1 - torch.tanh(x[:, 1:5] @ W.T) ** 2)[..., None] * W
    torch.testing.assert_close(J, ref)


def test_scan_backprop_of_a_plain_function_cell():
    """backprop_through by scan with a cell that is not torch's (generic Jacobians)."""
    from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

    m = VanillaRNN(VanillaRNNConfig(input_size=2, hidden=6, init_std=0.4)).to(D64)
    xs = torch.randn(2, 11, 2, dtype=D64)
    grads = {}
    for method in ("sequential", "scan", "quasi_newton"):
        m.zero_grad()
        hs, info = ffsolve.backprop_through(m.step, m.initial_state(2), xs, method=method)
        (m.readout(hs) ** 2).sum().backward()
        grads[method] = torch.cat([p.grad.flatten() for p in m.parameters()])
        assert info.converged
    torch.testing.assert_close(grads["scan"], grads["sequential"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grads["quasi_newton"], grads["sequential"], rtol=1e-12, atol=1e-13)


def test_cli_runs_rnn_forward(tmp_path, capsys):
    import json

    from ffsolve.cli import main

    sets = ["hidden=[3]", "lengths=[1,9]", "batches=[2]", "loop_max_length=5", "repeats=1"]
    sets += ["warmup=0", "dtype=float64", "atol=0.0"]
    argv = ["run", "rnn-forward", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    (run_dir,) = (tmp_path / "rnn-forward").iterdir()
    rows = json.loads((run_dir / "records.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {
        "cudnn",
        "sequential",
        "sequential_graph",
        "jacobi",
        "newton",
        "quasi_newton",
    }
    graph = [r for r in rows if r["method"] == "sequential_graph"]
    assert graph and all(r["skipped"] == "no CUDA graph on cpu" for r in graph)
    for r in rows:
        if r["method"] in ("jacobi", "newton", "quasi_newton"):
            assert r["converged"] and r["iters"] <= r["length"] and r["max_diff"] < 1e-14
    assert not any(r["method"] == "sequential" and r["length"] == 9 for r in rows)  # > loop max
    assert "quasi_newton" in capsys.readouterr().out


def test_cell_provided_jacobian_in_backprop_and_the_model():
    from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
    from ffsolve.problems.recurrence import _cell_jacobians

    m = VanillaRNN(VanillaRNNConfig(input_size=2, hidden=5, init_std=0.4)).to(D64)
    h, x = torch.randn(3, 5, dtype=D64), torch.randn(3, 2, dtype=D64)
    ref = _cell_jacobians(m.step, h, x, False)
    torch.testing.assert_close(m.step_jacobian(h, x), ref)
    torch.testing.assert_close(m.step_jacobian(h, x, True), ref.diagonal(dim1=1, dim2=2))
    xs = torch.randn(2, 9, 2, dtype=D64)
    grads = []
    for jac in (None, m.step_jacobian):
        m.zero_grad()
        hs, _ = ffsolve.backprop_through(m.step, m.initial_state(2), xs, "scan", jacobian=jac)
        (m.readout(hs) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_parallel_forward_and_parallel_backward_give_autograds_gradients(kind):
    cell, h0 = _cell(kind, B=2)
    xs = torch.randn(2, 15, 2, dtype=D64, generator=torch.Generator().manual_seed(8))
    grads = {}
    for label, kw in (
        ("autograd", None),
        ("newton+scan", {"forward_method": "newton"}),
        ("quasi+jacobi", {"forward_method": QuasiNewton(chunk=4)}),
    ):
        cell.zero_grad()
        if kw is None:
            hh = _unroll(cell, h0, xs)
        else:
            method = "scan" if label.endswith("scan") else "jacobi"
            hs, info = ffsolve.backprop_through(cell, h0, xs, method, **kw)
            hh = torch.cat(hs, -1) if isinstance(hs, tuple) else hs
            assert info.forward_solution.all_converged
            assert info.forward_solution.num_iters <= 15
        (hh.cos() * torch.linspace(0, 1, 15, dtype=D64)[:, None]).sum().backward()
        grads[label] = torch.cat([p.grad.flatten() for p in cell.parameters()])
    for label in ("newton+scan", "quasi+jacobi"):
        torch.testing.assert_close(grads[label], grads["autograd"], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="without forward_method"):
        ffsolve.backprop_through(cell, h0, xs, "scan", forward=Stopping(atol=1e-3))


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "scan"])
def test_structured_methods_are_not_captured(method):
    """capture="auto" runs them eagerly; capture=True names the reason (their sweeps do
    host-side work), whatever the device."""
    if method == "scan":
        g = torch.Generator().manual_seed(5)
        A = 0.5 * torch.randn(2, 9, 3, 3, dtype=D64, generator=g)
        problem = LinearRecurrenceProblem(A, torch.randn(2, 9, 3, dtype=D64, generator=g))
    else:
        cell, h0 = _cell("gru", B=2)
        xs = torch.randn(2, 9, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
        problem = RecurrenceForward(cell, h0, xs)
    sol = ffsolve.solve(problem, method=method, capture="auto")
    assert sol.all_converged and "captured" not in sol.stats
    assert torch.equal(ffsolve.solve(problem, method=method, capture=False).value, sol.value)
    with pytest.raises(ValueError, match="not capturable"):
        ffsolve.solve(problem, method=method, capture=True)


def test_newton_safeguards_count_live_sweeps_only():
    """A coarser check_every cannot add frozen sweeps to the safeguards' record."""
    cell, h0 = _cell("lstm", B=2)
    xs = torch.randn(2, 17, 2, dtype=D64, generator=torch.Generator().manual_seed(6))
    problem = RecurrenceForward(cell, h0, xs)
    one = ffsolve.solve(problem, method="newton", damping=0.5)
    four = ffsolve.solve(problem, method="newton", damping=0.5, check_every=4)
    assert torch.equal(one.value, four.value) and one.num_iters == four.num_iters
    for key in ("newton_fallbacks", "newton_nonfinite", "newton_residual"):
        assert one.stats[key] == four.stats[key], key
    assert len(four.stats["newton_residual"]) == four.num_iters
    with pytest.raises(ValueError, match="check_every"):
        ffsolve.solve(problem, method="newton", check_every=0)


def test_newton_guard_rejects_a_blown_up_step_before_it_is_taken():
    # h_t = tanh(20 h_{t-1}) + 0.01 x_t: the linearisation around h = 0 has slope 20, so a
    # Newton correction grows like 20^t while the states stay in [-1.1, 1.1]
    def steep(h, x):
        return torch.tanh(20.0 * h) + 0.01 * x

    xs = torch.randn(1, 40, 1, dtype=D64, generator=torch.Generator().manual_seed(3))
    problem = RecurrenceForward(steep, torch.zeros(1, 1, dtype=D64) + 1e-3, xs)
    seq = ffsolve.solve(problem, method="sequential").value
    largest: list[float] = []

    def watch(k, x):
        largest.append(float(x.abs().max()))

    with pytest.warns(ffsolve.DivergenceWarning, match="blew up"):
        sol = ffsolve.solve(problem, method="newton", guard=10.0, callback=watch)
    assert sum(sol.stats["newton_blowups"]) > 0
    assert max(largest) <= 2.0  # no blown-up iterate was ever taken
    assert sol.all_converged and sol.num_iters <= 40
    torch.testing.assert_close(sol.value, seq, rtol=0, atol=1e-12)
    largest.clear()
    unguarded = ffsolve.solve(problem, method="newton", callback=watch)  # the default: inf
    assert max(largest) > 1e6 and sum(unguarded.stats["newton_blowups"]) == 0
    torch.testing.assert_close(unguarded.value, seq, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="guard must be > 1"):
        ffsolve.solve(problem, method="newton", guard=0.5)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
def test_a_slice_scan_hands_out_its_affine_map_and_takes_the_entering_state(dense, chunk):
    """affine_scan of positions [s, e) with `exchange` (what Sharded combines over ranks): the
    map (P, y) it hands out carries the state entering s to the state leaving e - 1, and the
    state exchange returns enters the slice (the loop's values, to rounding)."""
    from ffsolve.solvers.scan import affine_scan

    g = torch.Generator().manual_seed(4)
    A = (
        torch.randn(2, 13, 3, 3, dtype=D64, generator=g) / 3
        if dense
        else torch.rand(2, 13, 3, dtype=D64, generator=g)
    )
    b = torch.randn(2, 13, 3, dtype=D64, generator=g)
    ref = _loop(A, b)
    rec = ffsolve.problems.LinearRecurrence(
        b, lambda s, e: A[:, s:e], "dense" if dense else "diagonal"
    )
    for s, e in ((0, 13), (4, 11), (5, 5), (12, 13)):
        maps = []
        h = ref[:, s - 1] if s else torch.zeros_like(b[:, 0])

        def exchange(P, y, h=h, maps=maps):
            maps.append((P, y))
            return h

        x = affine_scan(rec, chunk=chunk, start=s, stop=e, exchange=exchange)
        torch.testing.assert_close(x, ref[:, s:e], rtol=1e-13, atol=1e-13)
        ((P, y),) = maps  # exactly one exchange, also for an empty slice (the identity map)
        out = (P * h if not dense else (P @ h[..., None])[..., 0]) + y
        torch.testing.assert_close(out, ref[:, e - 1] if e > s else h, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="not inside"):
        affine_scan(rec, start=4, stop=14)
    with pytest.raises(ValueError, match="h0 or exchange"):
        affine_scan(rec, h0=b[:, 0], exchange=lambda P, y: y)
