"""BPTT by Jacobi iterations: gradients against torch.autograd, truncated budgets, errors,
and the rnn-backprop experiment end to end on synthetic data."""

import json
import warnings

import numpy as np
import pytest
import torch

import ffsolve
from ffsolve.cli import main
from ffsolve.experiments.rnn_backprop import downsample, next_pixel_inputs
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.problems import RecurrenceAdjoint
from ffsolve.problems.cells import vjp_operands

D64 = torch.float64
METHODS = [
    ("sequential", {}),
    ("jacobi", {}),
    ("jacobi_gs", {"block_size": 4}),
    ("gs_jacobi", {"window": 5}),
    ("gs_jacobi", {"block_size": 3}),
]


def _rnn(hidden=8, std=0.3, seed=0):
    return VanillaRNN(VanillaRNNConfig(input_size=2, hidden=hidden, init_std=std, seed=seed)).to(
        D64
    )


def _cell(kind):
    """(cell as passed to backprop_through, its parameters, state builder)."""
    g = torch.Generator().manual_seed(1)
    if kind == "vanilla":
        m = _rnn()
        return m.step, list(m.parameters()), lambda B: torch.randn(B, 8, dtype=D64, generator=g)
    if kind == "gru":
        m = torch.nn.GRUCell(2, 6).to(D64)
        return m, list(m.parameters()), lambda B: torch.randn(B, 6, dtype=D64, generator=g)
    m = torch.nn.LSTMCell(2, 5).to(D64)
    return (
        m,
        list(m.parameters()),
        lambda B: (
            torch.randn(B, 5, dtype=D64, generator=g),
            torch.randn(B, 5, dtype=D64, generator=g),
        ),
    )


def _unroll(cell, h0, xs):
    """The plain sequential loop, differentiated by torch.autograd (the reference)."""
    call = (lambda h, x: cell(x, h)) if isinstance(cell, torch.nn.RNNCellBase) else cell
    h, hs = h0, []
    for t in range(xs.shape[1]):
        h = call(h, xs[:, t])
        hs.append(h)
    if isinstance(h, tuple):
        return tuple(torch.stack([s[i] for s in hs], 1) for i in range(len(h)))
    return torch.stack(hs, 1)


def _loss(hs, weights):
    parts = hs if isinstance(hs, tuple) else (hs,)
    return sum((torch.tanh(p) * w).sum() for p, w in zip(parts, weights, strict=True))


def _leaves(h0):
    parts = h0 if isinstance(h0, tuple) else (h0,)
    return tuple(p.clone().requires_grad_() for p in parts)


def _grads(cell, params, h0, xs, weights, method=None, **kw):
    """Gradients w.r.t. (h0 parts, xs, params): autograd when method is None."""
    h0 = _leaves(h0)
    xs = xs.clone().requires_grad_()
    state = h0 if len(h0) > 1 else h0[0]
    info = None
    if method is None:
        hs = _unroll(cell, state, xs)
    else:
        hs, info = ffsolve.backprop_through(cell, state, xs, method, **kw)
    grads = torch.autograd.grad(
        _loss(hs, weights), [*h0, xs, *params], allow_unused=True, materialize_grads=True
    )
    return grads, info


def _weights(hs_like, g):
    parts = hs_like if isinstance(hs_like, tuple) else (hs_like,)
    return [torch.randn(p.shape, dtype=D64, generator=g) for p in parts]


@pytest.mark.parametrize("kind", ["vanilla", "gru", "lstm"])
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
def test_gradients_equal_autograd(kind, method, opts):
    cell, params, state = _cell(kind)
    g = torch.Generator().manual_seed(2)
    B, T = 3, 13
    h0, xs = state(B), torch.randn(B, T, 2, dtype=D64, generator=g)
    with torch.no_grad():
        w = _weights(_unroll(cell, h0, xs), g)
    ref, _ = _grads(cell, params, h0, xs, w)
    got, info = _grads(cell, params, h0, xs, w, method, **opts)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert info.converged and info.backward_calls == 1
    assert info.num_iters <= T
    if method == "jacobi":
        # exactness needs T iterations at most; the certificate may stop earlier
        assert len(info.residuals) == info.num_iters
        adj = info.adjoints  # (B, T, F), time order
        assert adj.shape == (B, T, sum(p.shape[1] for p in _leaves(h0)))


def test_hand_written_bptt_equals_autograd_on_the_model_loss():
    """The experiment's loss: next-pixel regression through the readout."""
    model = VanillaRNN(VanillaRNNConfig(hidden=16, seed=3)).to(D64)
    x = torch.rand(2, 25, 1, dtype=D64, generator=torch.Generator().manual_seed(0))
    u = next_pixel_inputs(x)
    out, _ = model(u)
    ref = torch.autograd.grad(((out - x) ** 2).mean(), list(model.parameters()))
    hs, info = ffsolve.backprop_through(model.step, model.initial_state(2), u, "sequential")
    loss = ((model.readout(hs) - x) ** 2).mean()
    got = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert info.num_iters == 25 and info.final_residual is None  # sequential records none


def _truncated_reference(model, h0, xs, w, k):
    """k-step truncated BPTT: loss term t reaches only steps t-k+1..t (and h0 if t <= k)."""
    T = xs.shape[1]
    params = list(model.parameters())
    h0 = h0.clone().requires_grad_()
    xs = xs.clone().requires_grad_()
    with torch.no_grad():
        exact = [h0.detach()]
        for t in range(T):
            exact.append(model.step(exact[-1], xs[:, t]))
    loss = 0.0
    for t in range(1, T + 1):  # the term <w_t, tanh(h_t)>
        s = max(t - k, 0)
        h = h0 if s == 0 else exact[s]
        for j in range(s, t):
            h = model.step(h, xs[:, j])
        loss = loss + (torch.tanh(h) * w[:, t - 1]).sum()
    return torch.autograd.grad(loss, [h0, xs, *params], allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_budget_k_is_k_step_truncated_bptt(k):
    model = _rnn(std=0.4)
    g = torch.Generator().manual_seed(5)
    B, T = 2, 12
    h0 = torch.randn(B, 8, dtype=D64, generator=g)
    xs = torch.randn(B, T, 2, dtype=D64, generator=g)
    w = torch.randn(B, T, 8, dtype=D64, generator=g)
    params = list(model.parameters())
    with pytest.warns(ffsolve.ConvergenceWarning):
        got, info = _grads(model.step, params, h0, xs, [w], "jacobi", max_iters=k)
    assert info.num_iters == k and info.converged is False
    ref = _truncated_reference(model, h0, xs, w, k)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and truncation really changes the answer (the test could fail)
    full, _ = _grads(model.step, params, h0, xs, [w])
    assert max(float((a - b).abs().max()) for a, b in zip(got, full, strict=True)) > 1e-6


def test_budget_last_k_adjoints_exact_and_error_decreases():
    cell, params, state = _cell("gru")
    g = torch.Generator().manual_seed(7)
    B, T = 2, 30
    h0, xs = state(B), torch.randn(B, T, 2, dtype=D64, generator=g)
    w = [torch.randn(B, T, 6, dtype=D64, generator=g)]
    exact, info = _grads(cell, params, h0, xs, w, "sequential")
    a_exact = info.adjoints
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ffsolve.ConvergenceWarning)
        for k in (1, 2, 4, 8, 16):
            got, info = _grads(cell, params, h0, xs, w, "jacobi", max_iters=k)
            adj = info.adjoints
            torch.testing.assert_close(adj[:, T - k :], a_exact[:, T - k :], rtol=1e-12, atol=1e-14)
            assert float((adj[:, : T - k] - a_exact[:, : T - k]).abs().max()) > 0
            sq = sum(float((a - b).norm() ** 2) for a, b in zip(got, exact, strict=True))
            errors.append(sq**0.5)
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:], strict=False)), errors


def test_tolerance_stops_early_and_is_close():
    model = VanillaRNN(VanillaRNNConfig(input_size=2, hidden=16, init_std=0.1)).to(D64)
    g = torch.Generator().manual_seed(8)
    h0 = torch.zeros(2, 16, dtype=D64)
    xs = torch.randn(2, 60, 2, dtype=D64, generator=g)
    w = [torch.randn(2, 60, 16, dtype=D64, generator=g)]
    params = list(model.parameters())
    exact, _ = _grads(model.step, params, h0, xs, w, "sequential")
    got, info = _grads(model.step, params, h0, xs, w, "jacobi", atol=1e-9)
    assert info.converged and info.num_iters < 60
    assert info.final_residual is not None and len(info.residuals) == info.num_iters
    for a, b in zip(got, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    d = info.as_dict()
    assert json.loads(json.dumps(d))["num_iters"] == info.num_iters


def test_info_before_and_after_backward_and_retained_graph():
    model = _rnn()
    xs = torch.randn(3, 10, 2, dtype=D64)
    hs, info = ffsolve.backprop_through(model.step, torch.zeros(3, 8, dtype=D64), xs, record=False)
    assert info.solution is None and info.num_iters is None and info.method == "jacobi"
    loss = hs.square().sum()
    loss.backward(retain_graph=True)
    cell_params = [model.W_h, model.W_x, model.b_h]
    first = [p.grad.clone() for p in cell_params]
    assert model.W_o.grad is None  # unused by the cell and the loss: left alone, as by autograd
    assert info.backward_calls == 1 and info.residuals is None  # record=False
    loss.backward()  # accumulates, exactly like autograd
    for p, f in zip(cell_params, first, strict=True):
        torch.testing.assert_close(p.grad, 2 * f)
    assert info.backward_calls == 2


def test_time_major_layout_matches_batch_first():
    cell, params, state = _cell("lstm")
    h0 = state(2)
    xs = torch.randn(2, 7, 2, dtype=D64)
    a, _ = ffsolve.backprop_through(cell, h0, xs)
    b, _ = ffsolve.backprop_through(cell, h0, xs.transpose(0, 1), batch_first=False)
    assert isinstance(a, tuple) and a[0].shape == (2, 7, 5) and b[0].shape == (7, 2, 5)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y.transpose(0, 1), rtol=0, atol=0)


def test_closure_params_non_leaf_weights_and_token_inputs():
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Parameter(torch.randn(5, 4, dtype=D64, generator=g))
    v = torch.nn.Parameter(torch.randn(4, 4, dtype=D64, generator=g))
    W = 0.5 * v / v.norm()  # a non-leaf weight: its gradient must reach v

    def cell(h, tok):
        return torch.tanh(h @ W + emb[tok])

    tokens = torch.randint(0, 5, (2, 9), generator=g)
    h0 = torch.zeros(2, 4, dtype=D64)

    def loss_of(hs):
        return hs.sin().sum()

    h = h0
    ref_hs = []
    for t in range(9):
        h = cell(h, tokens[:, t])
        ref_hs.append(h)
    ref = torch.autograd.grad(loss_of(torch.stack(ref_hs, 1)), [emb, v], retain_graph=True)
    hs, _ = ffsolve.backprop_through(cell, h0, tokens, "jacobi", params=[W, emb])
    got = torch.autograd.grad(loss_of(hs), [emb, v])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not in params"):
        ffsolve.backprop_through(cell, h0, tokens, params=[emb])


def test_bad_shapes_nan_and_methods_raise_clear_errors():
    model = _rnn()
    h0 = torch.zeros(3, 8, dtype=D64)
    xs = torch.randn(3, 10, 2, dtype=D64)
    with pytest.raises(ValueError, match=r"xs must be \(B, T, D\)"):
        ffsolve.backprop_through(model.step, h0, xs[:, :, 0])
    with pytest.raises(ValueError, match="batch size 3"):
        ffsolve.backprop_through(model.step, h0[:2], xs)
    with pytest.raises(ValueError, match=r"xs must be \(T, B, D\)"):
        ffsolve.backprop_through(model.step, h0, xs[0], batch_first=False)
    with pytest.raises(ValueError, match="batch size 10"):
        ffsolve.backprop_through(model.step, h0, xs, batch_first=False)
    bad = xs.clone()
    bad[1, 6, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf at time step 6 \\(batch item 1\\)"):
        ffsolve.backprop_through(model.step, h0, bad)
    with pytest.raises(ValueError, match="NaN or Inf at time step 6"):
        ffsolve.backprop_through(model.step, h0, bad.transpose(0, 1), batch_first=False)
    with pytest.raises(ValueError, match="valid methods"):
        ffsolve.backprop_through(model.step, h0, xs, "newton_raphson")
    with pytest.raises(TypeError, match="does not take window"):
        ffsolve.backprop_through(model.step, h0, xs, "jacobi", window=3)
    with pytest.raises(ValueError, match="max_iters must be >= 1"):
        ffsolve.backprop_through(model.step, h0, xs, max_iters=0)
    with pytest.raises(ValueError, match="changed the state's shape"):
        ffsolve.backprop_through(lambda h, x: h[:, :4], h0, xs)
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        ffsolve.backprop_through(lambda h, x: h[0], (h0, h0), xs)
    with pytest.raises(TypeError, match="h0 must be a tensor"):
        ffsolve.backprop_through(model.step, [1.0], xs)


def test_hidden_state_blowing_up_names_the_time_step():
    def cell(h, x):
        return torch.where(x > 100, torch.full_like(h, float("inf")), torch.tanh(h + x))

    xs = torch.zeros(1, 8, 3, dtype=D64)
    xs[0, 5] = 1000.0
    with pytest.raises(ffsolve.NonFiniteError, match="time step 5"):
        ffsolve.backprop_through(cell, torch.zeros(1, 3, dtype=D64), xs)


def test_nan_in_loss_gradient_is_reported():
    model = _rnn()
    xs = torch.randn(2, 10, 2, dtype=D64)
    hs, _ = ffsolve.backprop_through(model.step, torch.zeros(2, 8, dtype=D64), xs)
    with pytest.raises(ffsolve.NonFiniteError, match="NaN or Inf"):
        (hs * float("nan")).sum().backward()


def test_problem_can_be_solved_directly():
    model = _rnn(std=0.3)
    g = torch.Generator().manual_seed(4)
    B, T, H = 2, 11, 8
    xs = torch.randn(B, T, 2, dtype=D64, generator=g)
    with torch.no_grad():
        _, hs = model(xs)
    h_prev = torch.cat([model.initial_state(B)[:, None], hs[:, :-1]], 1)
    grad_h = torch.randn(B, T, H, dtype=D64, generator=g)
    problem = RecurrenceAdjoint(model.step, h_prev, xs, grad_h, xs_grad=True)
    ref = ffsolve.solve(problem, method="sequential")
    for method in ("jacobi", "jacobi_gs", "gs_jacobi"):
        sol = ffsolve.solve(problem, method=method)
        assert sol.all_converged
        torch.testing.assert_close(sol.value, ref.value, rtol=1e-12, atol=1e-14)
    dh0, dxs, dparams = problem.input_grads(ref.value, list(model.parameters()))
    assert dh0.shape == (B, H) and dxs.shape == xs.shape
    assert dparams[-1] is None  # the readout's bias is not used by the cell


def test_vanilla_rnn_model():
    a, b = _rnn(seed=1), _rnn(seed=1)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert float(a.b_h.detach().abs().sum()) == 0.0 and float(a.W_h.detach().std()) > 0.1
    out, hs = a(torch.randn(3, 7, 2, dtype=D64))
    assert out.shape == (3, 7, 1) and hs.shape == (3, 7, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 2\)"):
        a(torch.randn(3, 7, dtype=D64))


def test_downsample_is_an_exact_box_average():
    img = np.full((1, 28, 28), 255, dtype=np.uint8)
    x = downsample(img, 10).view(10, 10)  # 28 -> padded 30 -> 3x3 means
    assert x.shape == (10, 10)
    torch.testing.assert_close(x[0, 0], torch.tensor(4 / 9))  # corner: 2x2 of 3x3 inside
    torch.testing.assert_close(x[0, 5], torch.tensor(6 / 9))  # edge: 2x3 of 3x3
    torch.testing.assert_close(x[5, 5], torch.tensor(1.0))
    rnd = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    y = downsample(rnd, 10)
    assert y.shape == (4, 100) and float(y.min()) >= 0 and float(y.max()) <= 1
    padded = np.pad(rnd.astype(np.float64) / 255, ((0, 0), (1, 1), (1, 1)))
    box = padded.reshape(4, 10, 3, 10, 3).mean((2, 4)).reshape(4, 100)
    np.testing.assert_allclose(y.numpy(), box, rtol=1e-6, atol=1e-6)


def test_cli_runs_rnn_backprop_and_plot_redraws(tmp_path, capsys):
    args = ["run", "rnn-backprop", "--device", "cpu", "--out", str(tmp_path)]
    sets = [
        "data=synthetic",
        "side=4",
        "hidden=8",
        "steps=6",
        "repeats=2",
        "budgets=[2, 5]",
        "error_sequences=2",
        "warmup=1",
        "dtype=float64",
        "tol_atol=1.0e-10",
    ]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final EMA loss" in out and "jacobi-tol" in out and "vs bptt" in out
    (run_dir,) = (tmp_path / "rnn-backprop").iterdir()
    rec = json.loads((run_dir / "records.json").read_text())
    assert rec["experiment"] == "rnn-backprop" and rec["length"] == 16
    methods = {m["method"]: m for m in rec["methods"]}
    assert list(methods) == ["bptt", "jacobi-2", "jacobi-5", "jacobi-tol", "scan", "autograd"]
    for m in methods.values():
        assert len(m["runs"]) == 2
        for r in m["runs"]:
            assert len(r["loss"]) == len(r["step_time_s"]) == len(r["iters"]) == 6
            assert all(t > 0 for t in r["step_time_s"])
    assert methods["bptt"]["mean_iters_per_step"] == 16
    assert methods["jacobi-2"]["mean_iters_per_step"] == 2
    assert methods["jacobi-2"]["converged_fraction"] == 0
    assert methods["jacobi-tol"]["converged_fraction"] == 1
    assert methods["bptt"]["max_grad_error"] == 0.0
    assert methods["scan"]["mean_iters_per_step"] == 1 and methods["scan"]["max_grad_error"] < 1e-12
    assert methods["jacobi-2"]["max_grad_error"] > methods["jacobi-5"]["max_grad_error"]
    assert rec["hand_written_vs_autograd_max_abs"] < 1e-12
    assert rec["hand_written_vs_autograd_max_abs_float64"] < 1e-12
    curve = rec["grad_error"]["curve"]
    assert len(curve["init"]["mean"]) == 6 and len(curve["trained"]["all"]) == 2
    assert curve["init"]["mean"][5] < curve["init"]["mean"][2] < curve["init"]["mean"][0]
    pngs = ["grad_error.png", "loss_vs_time.png", "loss_vs_step.png"]
    for name in pngs:
        assert (run_dir / name).is_file()
        (run_dir / name).unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert all((run_dir / name).is_file() for name in pngs)


def test_rnn_backprop_rows_with_a_parallel_forward(tmp_path, capsys):
    """forward_rows repeat a row with the states by Jacobi: exact at atol 0 (float64), so the
    loss curve is BPTT's; a long synthetic side passes, a long MNIST side does not."""
    args = ["run", "rnn-backprop", "--device", "cpu", "--out", str(tmp_path)]
    sets = ["data=synthetic", "side=5", "hidden=6", "steps=3", "repeats=1", "budgets=[3]",
            "error_sequences=1", "warmup=0", "dtype=float64", "tol_row=false",
            "autograd_row=false", "forward_rows=[scan, jacobi-3]", "forward_atol=0.0"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert "loss vs bptt" in (out := capsys.readouterr().out) and "fwd sweeps" in out
    (run_dir,) = (tmp_path / "rnn-backprop").iterdir()
    rec = json.loads((run_dir / "records.json").read_text())
    methods = {m["method"]: m for m in rec["methods"]}
    assert list(methods) == ["bptt", "jacobi-3", "scan", "scan+jacobi-fwd", "jacobi-3+jacobi-fwd"]
    fwd = methods["scan+jacobi-fwd"]
    assert fwd["options"]["forward_method"] == "jacobi" and fwd["solver"] == "scan"
    assert fwd["max_loss_rel_diff_vs_bptt"] < 1e-12 and fwd["max_grad_error"] < 1e-12
    assert 1 <= fwd["mean_forward_iters_per_step"] <= 25
    assert methods["scan"]["mean_forward_iters_per_step"] is None
    assert methods["bptt"]["max_loss_rel_diff_vs_bptt"] == 0.0
    dev = {k: m["max_loss_rel_diff_vs_bptt"] for k, m in methods.items()}
    assert dev["jacobi-3+jacobi-fwd"] == dev["jacobi-3"]  # the exact forward changes nothing
    for bad, msg in (("forward_rows=[bptt]", "forward_rows must be"), ("side=30", "side 28")):
        base = ["run", "rnn-backprop", "--device", "cpu", "--out", str(tmp_path)]
        assert main([*base, "--set", bad]) == 2
        assert msg in capsys.readouterr().err


def test_cli_missing_mnist_is_a_one_line_error(tmp_path, capsys):
    args = ["run", "rnn-backprop", "--device", "cpu", "--out", str(tmp_path)]
    args += ["--set", f"data_dir={tmp_path / 'nowhere'}"]
    assert main(args) == 2
    assert "MNIST folder" in capsys.readouterr().err
    assert main([*args[:6], "--set", "data=cifar"]) == 2
    assert "allowed one of 'mnist', 'synthetic'" in capsys.readouterr().err


def _cells():
    g = torch.Generator().manual_seed(0)
    rnn = VanillaRNN(VanillaRNNConfig(input_size=3, hidden=6, init_std=0.4)).double()
    yield rnn.step, rnn.step, 6
    for cls, kw in (
        (torch.nn.RNNCell, {"nonlinearity": "tanh"}),
        (torch.nn.RNNCell, {"nonlinearity": "relu"}),
        (torch.nn.GRUCell, {}),
    ):
        cell = cls(3, 5, **kw).double()
        yield cell, (lambda h, x, c=cell: c(x, h)), 5
    lstm = torch.nn.LSTMCell(3, 4).double()

    def flat_lstm(hc, x):
        return torch.cat(lstm(x, (hc[:, :4], hc[:, 4:])), 1)

    yield lstm, flat_lstm, 8
    del g


@pytest.mark.parametrize("i", range(5))
def test_cell_vjp_operands_equal_autograd(i):
    cell, flat, F = list(_cells())[i]
    g = torch.Generator().manual_seed(i)
    N = 7
    h = torch.randn(N, F, dtype=D64, generator=g)
    x = torch.randn(N, 3, dtype=D64, generator=g)
    a = torch.randn(N, F, dtype=D64, generator=g)
    vjp = vjp_operands(cell, h, x)
    assert vjp is not None
    hh = h.clone().requires_grad_()
    (ref,) = torch.autograd.grad(flat(hh, x), hh, a)
    torch.testing.assert_close(vjp(a), ref, rtol=1e-12, atol=1e-14)


def test_unknown_cell_has_no_operands():
    h = torch.zeros(2, 3)
    assert vjp_operands(lambda h, x: torch.tanh(h + x), h, h) is None


@pytest.mark.parametrize("method", ["jacobi", "jacobi_gs", "gs_jacobi", "sequential"])
def test_backprop_fast_vjp_equals_autograd_sweeps(method):
    rnn = VanillaRNN(VanillaRNNConfig(input_size=2, hidden=8, init_std=0.3)).double()
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 17, 2, dtype=D64, generator=g)
    w = torch.randn(2, 17, 8, dtype=D64, generator=g)
    params = [rnn.W_h, rnn.W_x, rnn.b_h]
    grads = []
    for fast in (True, False):
        h0 = rnn.initial_state(2)
        hs, info = ffsolve.backprop_through(rnn.step, h0, xs, method, fast_vjp=fast, params=params)
        grads.append(torch.autograd.grad((torch.tanh(hs) * w).sum(), params))
        assert info.converged
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_captured_backward_replays_the_scan_backward(fake_graphs, monkeypatch):
    """capture of a direct method's backward: captured once per key and replayed on fresh
    inputs, reading the parameters in place; gradients equal the ordinary scan backward's
    bitwise (the same kernels); NaN in the adjoints is located; a failed capture falls back."""
    import ffsolve.backprop as bp
    import ffsolve.graphs

    bp.clear_graphed_backwards()
    rnn = VanillaRNN(VanillaRNNConfig(hidden=6, seed=0)).double()
    params = [rnn.W_h, rnn.W_x, rnn.b_h]

    def grads(x, capture, weight=None):
        hs, info = ffsolve.backprop_through(
            rnn.step, rnn.initial_state(2), x, "scan", params=params, capture=capture
        )
        out = rnn.readout(hs) ** 2
        loss = (out if weight is None else out * weight).sum()
        return torch.autograd.grad(loss, params), info

    def check(x, replays):
        ref, _ = grads(x, False)
        got, info = grads(x, True)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b)
        assert info.solution.stats["graphed_backward"] and info.solution.num_iters == 1
        (entry,) = bp._GRAPHED.values()
        assert entry.call.graph.replays == replays

    for seed in (0, 1):  # the second backward replays the cached graph on new inputs
        check(
            torch.rand(2, 9, 1, dtype=D64, generator=torch.Generator().manual_seed(seed)), seed + 1
        )
    with torch.no_grad():
        rnn.W_h.mul_(0.5)  # an optimizer-like update in place: the replay reads it, and the
        # gradients are recorded anew (autograd refuses a graph saved before the update)
    x = torch.rand(2, 9, 1, dtype=D64, generator=torch.Generator().manual_seed(2))
    check(x, 3)
    weight = torch.ones(2, 9, 1, dtype=D64)
    weight[1, 6] = float("nan")  # dL/dh_7 is NaN: adjoint position 9 - 7 = 2 in reversed time
    with pytest.raises(ffsolve.NonFiniteError, match="iteration 1, position 2"):
        grads(x, True, weight)
    with pytest.raises(ValueError, match="capture must be"):
        ffsolve.backprop_through(rnn.step, rnn.initial_state(2), x, "scan", capture=1)

    for T in range(3, 3 + bp.GRAPHED_CACHE + 2):  # new shapes: the least recent graphs go
        grads(torch.rand(2, T, 1, dtype=D64), True)
    assert len(bp._GRAPHED) == bp.GRAPHED_CACHE

    def broken(body, times=1, warmup=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ffsolve.graphs, "capture", broken)
    bp.clear_graphed_backwards()
    ref, _ = grads(x, False)
    with pytest.warns(RuntimeWarning, match="capturing the backward failed"):
        got, info = grads(x, True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert "graphed_backward" not in info.solution.stats  # the ordinary backward ran


def test_capture_true_on_the_cpu_is_a_clear_error():
    rnn = VanillaRNN(VanillaRNNConfig(hidden=4, seed=0)).double()
    x = torch.rand(1, 5, 1, dtype=D64)
    for method in ("scan", "jacobi"):
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            hs, _ = ffsolve.backprop_through(
                rnn.step, rnn.initial_state(1), x, method, capture=True
            )
            hs.sum().backward()
