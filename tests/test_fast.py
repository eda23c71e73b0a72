"""The fast paths return what the plain paths return (issue 10).

CUDA-graph capture cannot run on the CPU; the captured mode replays the SAME device step as the
eager mode, so here the graph is replaced by an object that replays the step eagerly, and every
other part of the captured driver (chunking, caching on the problem, buffer reset) is tested.
"""

import pytest
import torch

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.models.made import MADE, MADEConfig
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.problems.autoregressive import MADESampling, logistic_noise
from ffsolve.problems.cells import vjp_operands
from ffsolve.solvers import base as loop_base
from ffsolve.solvers import sequential as seq_module
from systems import chain, dense

D64 = torch.float64


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the captured body eagerly."""

    def __init__(self, body, n):
        self.body, self.n, self.replays = body, n, 0

    def replay(self):
        self.replays += 1
        for _ in range(self.n):
            self.body()


@pytest.fixture
def fake_graphs(monkeypatch):
    """Make the captured mode run on the CPU with eager replays of the same step."""

    def capture(body, n):
        for _ in range(n):  # the warm-up chunk is real work, as on the GPU
            body()
        return _EagerGraph(body, n)

    def mode(capture_opt, *args):
        return "graph" if capture_opt is True else "eager"

    monkeypatch.setattr(loop_base, "_capture", capture)
    monkeypatch.setattr(seq_module, "_capture", capture)
    monkeypatch.setattr(loop_base, "_capture_mode", mode)
    monkeypatch.setattr(seq_module, "_sequential_mode", mode)


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
    assert again.stats["check_every"] == list(loop_base.DEFAULT_CHUNKS)
    assert first.stats["captured"]
    _same(first, ref)
    _same(again, ref)  # the cached loop, reset and replayed
    (loop,) = problem._ffsolve_graphs.values()
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


def test_bench_cli_tiny_cases(tmp_path, capsys):
    from ffsolve.cli import main
    from ffsolve.models.made import save_made

    ckpt = tmp_path / "made_tiny"
    made = MADE(MADEConfig(dims=12, hidden=(16, 16), seed=0))
    save_made(ckpt, made, {"data": {"lam": 1e-6, "shape": [1, 3, 4]}})
    sets = [
        f"checkpoint={ckpt}",
        f"rgb_checkpoint={tmp_path / 'absent'}",
        "batch=2",
        "batches=[1, 2]",
        "mnist_block=3",
        "rnn_lengths=[6]",
        "rnn_hidden=4",
        "rnn_budget=3",
        "repeats=1",
        "warmup=0",
    ]
    argv = ["bench", "made-mnist", "made-rgb", "made-batch", "rnn-backprop", "--device", "cpu"]
    argv += ["--out", str(tmp_path / "runs")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "runs" / "bench").iterdir()
    rec = __import__("json").loads((run_dir / "records.json").read_text())
    cases = rec["cases"]
    assert "skipped" in cases["made-rgb"]
    rows = {r["method"]: r for r in cases["made-mnist"]["rows"]}
    assert not any("error" in r for r in rows.values())
    for label in ("jacobi", "sequential naive graph", "jacobi_gs(block=3)"):
        assert rows[label]["equal_to_sequential"], label  # same kernels as the naive loop
    assert rows["jacobi"]["strongest_baseline"].startswith("sequential")
    assert {"median_s", "min_s", "max_s", "peak_mem_mb", "mem_before_mb"} <= set(rows["jacobi"])
    (entry,) = cases["rnn-backprop"]["lengths"]
    rnn = {r["method"]: r for r in entry["rows"]}
    assert rnn["autograd BPTT"]["relative_grad_error"] == 0.0
    assert rnn["jacobi rtol=1e-6"]["relative_grad_error"] < 1e-5
    assert rnn["scan"]["relative_grad_error"] < 1e-5  # exact up to rounding
    assert rnn["jacobi forward atol 1e-5 + scan"]["relative_grad_error"] < 1e-4
    assert len(cases["made-batch"]["batches"]) == 2
    assert any(t["status"] == "pass" for t in rec["targets"])
    assert "issue-10 and issue-11 targets" in capsys.readouterr().out


def test_bench_targets_read_each_rows_solver():
    """Issue 11's rows: the scan target reads scan rows only; the whole-step target at
    T = 10,000 takes any parallel row (here one with a parallel forward), never autograd's."""
    from ffsolve.experiments.bench_suite import check_targets

    def row(method, solver, bwd, step):
        return {"method": method, "solver": solver, "backward_speedup": bwd,
                "train_speedup": step, "relative_grad_error": 1e-7}  # fmt: skip

    rows = [
        row("autograd BPTT", None, 1.0, 1.0),
        row("jacobi budget 24", "jacobi", 57.0, 4.0),
        row("scan", "scan", 53.0, 3.8),
        row("jacobi forward atol 1e-5 + scan", "scan", 50.0, 41.0),
    ]
    records = {"cases": {"rnn-backprop": {"lengths": [{"length": 10000, "rows": rows}]}}}
    got = {(t["row"], t["what"]): t for t in check_targets(records)}
    step = got[("T=10000", "any train step x vs autograd")]
    assert step["measured"] == 41.0 and step["status"] == "pass"
    assert got[("T=10000", "backward x vs autograd")]["measured"] == 57.0  # Jacobi rows only
    assert got[("T=10000", "backward x vs autograd")]["status"] == "miss by 1.75x"
    assert got[("T=100", "scan backward x vs autograd")]["status"] == "n/a"  # no T = 100 entry


def test_reproduce_cli_tiny_report(tmp_path, capsys):
    from ffsolve.cli import main
    from ffsolve.models.made import save_made

    ckpt = tmp_path / "made_tiny"
    save_made(
        ckpt,
        MADE(MADEConfig(dims=12, hidden=(16, 16))),
        {"data": {"name": "x", "lam": 1e-6, "shape": [1, 3, 4]}},
    )
    made = [f"checkpoint={ckpt}", "batch=2", "repeats=1", "block_size=3", "window=4"]
    made += ["strip_frames=2", "strip_images=1", "grid_images=2"]
    rnn = ["data=synthetic", "side=4", "hidden=8", "steps=2", "repeats=1", "budgets=[2]"]
    rnn += ["error_sequences=1", "warmup=0"]
    argv = ["reproduce", "--device", "cpu", "--out", str(tmp_path / "runs")]
    argv += ["--steps", "made-mnist", "made-rgb", "rnn-backprop", "breakeven"]
    for step, sets in (("made-mnist", made), ("rnn-backprop", rnn)):
        argv += [x for s in sets for x in ("--override", f"{step}:{s}")]
    argv += ["--override", "made-rgb:checkpoint=" + str(tmp_path / "absent")]
    argv += ["--override", "breakeven:lengths=[8]", "--override", "breakeven:batches=[1]"]
    assert main(argv) == 0
    (report_dir,) = (tmp_path / "runs" / "reproduce").iterdir()
    text = (report_dir / "REPORT.md").read_text()
    assert "| made-mnist | Jacobi iterations | 31 |" in text
    assert "skipped: no checkpoint" in text and "rnn-backprop" in text and "## breakeven" in text
    assert main(["reproduce", "--override", "nope:x=1", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--steps", "nope", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--from", f"made-mnist={tmp_path}", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    argv = ["reproduce", "--steps", "densenet-bc", "--fmnist-dir", str(tmp_path / "absent")]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "bad")]) == 0
    err = capsys.readouterr().err  # missing data: one line, the next step would still run
    assert "densenet-bc failed: Fashion-MNIST folder" in err and "Traceback" not in err
    (bad,) = (tmp_path / "bad" / "reproduce").iterdir()
    assert "failed: DataError" in (bad / "REPORT.md").read_text()


def test_reproduce_from_earlier_runs(tmp_path, capsys):
    """--from puts a report together from runs made earlier (as in several GPU calls): the
    PixelCNN++ and DenseNet rows beside the paper's, figure links relative to --report."""
    from ffsolve.cli import main
    from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig, save_pixelcnnpp

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_pcnn"
    cfg = PixelCNNppConfig(channels=1, height=4, width=4, filters=4, resnets=1, mixtures=2)
    save_pixelcnnpp(ckpt, PixelCNNpp(cfg).eval(), {"data": {"name": "random"}})
    runs = tmp_path / "runs"
    common = ["--device", "cpu", "--out", str(runs), "--quiet"]
    pcnn = ["--config", "configs/pixelcnn_sampling_mnist.yaml", "--set", f"checkpoint={ckpt}"]
    for kv in ("batch=2", "window_rows=2", "repeats=1", "warmup=0", "frames=[0, 1]",
               "grid_images=2"):  # fmt: skip
        pcnn += ["--set", kv]
    assert main(["run", "pixelcnn-sampling", *pcnn, *common]) == 0
    dense = ["--set", "checkpoint=null", "--set", "arch=densenet121", "--set", "image_size=32"]
    for kv in ("batches=[1]", "repeats=1", "warmup=0", "sweeps=[fused]"):
        dense += ["--set", kv]
    assert main(["run", "densenet-jacobi", *dense, *common]) == 0
    (pdir,) = (runs / "pixelcnn-sampling").iterdir()
    (ddir,) = (runs / "densenet-jacobi").iterdir()
    report = tmp_path / "repo" / "RESULTS.md"
    argv = ["reproduce", "--from", f"pixelcnn-mnist={pdir}", "--from", f"densenet-201={ddir}"]
    assert main([*argv, "--report", str(report), *common]) == 0
    text = report.read_text()
    assert "| pixelcnn-mnist | sequential-cached | 8.23 s |" in text
    assert "| pixelcnn-mnist | best parallel vs cached sequential | 4.4x |" in text
    assert "| densenet-201 | batch 1 | 0.0279 s vs 0.0131 s: 2.13x, simulated |" in text
    assert "ESTIMATE" in text and "## made-mnist" not in text  # only the steps given
    assert "](../runs/pixelcnn-sampling/" in text  # links relative to the report
    assert "commit" in text and "cpu" in text


def test_bench_densenet_case_cpu(tmp_path):
    """The DenseNet bench case on the shipped DenseNet-BC: exact Jacobi agrees with the
    forward to rounding within T sweeps; the tolerance stops earlier."""
    from ffsolve.cli import main

    argv = ["bench", "densenet", "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    for kv in ("densenet_batches=[1]", "repeats=1", "warmup=0"):
        argv += ["--set", kv]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "bench").iterdir()
    rec = __import__("json").loads((run_dir / "records.json").read_text())
    (entry,) = rec["cases"]["densenet"]["batches"]
    rows = {r["method"]: r for r in entry["rows"]}
    assert not any("error" in r for r in rows.values())
    exact, tol = rows["jacobi fused-unfold, atol=0"], rows["jacobi fused-unfold, atol=0.001"]
    assert exact["num_iters"] <= 48 and exact["max_abs_diff_vs_sequential"] < 1e-4
    assert tol["num_iters"] < exact["num_iters"]
    assert rows["sequential forward (eager)"]["strongest_baseline"] == "sequential forward (eager)"


def test_bench_rnn_forward_case_maps_the_winners(tmp_path, capsys):
    from ffsolve.cli import main

    argv = ["bench", "rnn-forward", "--device", "cpu", "--out", str(tmp_path)]
    for kv in ("rnnf_hidden=[4]", "rnnf_lengths=[40, 80]", "rnnf_batches=[2]", "repeats=1"):
        argv += ["--set", kv]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "bench").iterdir()
    case = __import__("json").loads((run_dir / "records.json").read_text())["cases"]["rnn-forward"]
    win = case["winners"]
    assert [(w["cell"], w["length"]) for w in win] == [
        ("gru", 40), ("gru", 80), ("lstm", 40), ("lstm", 80)
    ]  # fmt: skip
    for w in win:  # on a CPU there is no cuDNN row: the fastest is a parallel method
        assert w["winner"] in ("jacobi", "quasi_newton") and w["best_parallel_vs_cudnn"] is None
        rows = [r for r in case["rows"] if (r["cell"], r["length"]) == (w["cell"], w["length"])]
        assert w["time_s"] == min(r["time_s"] for r in rows if "time_s" in r)
    assert "where each method wins" in capsys.readouterr().out


def test_graph_backward_replays_the_scan_backward(monkeypatch):
    """graph_backward: the backward is captured once per key and replayed on fresh inputs,
    reading the parameters in place; gradients equal the ordinary scan backward's bitwise
    (the same kernels); NaN in the adjoints is located; a failed capture falls back."""
    import ffsolve.backprop as bp

    monkeypatch.setattr(bp, "_capture", lambda body, n: (body(), _EagerGraph(body, n))[1])
    monkeypatch.setattr(bp, "_graphable", lambda plan, hs: plan.graph_backward)
    bp.clear_graphed_backwards()
    rnn = VanillaRNN(VanillaRNNConfig(hidden=6, seed=0)).double()
    params = [rnn.W_h, rnn.W_x, rnn.b_h]

    def grads(x, graph, weight=None):
        hs, info = ffsolve.backprop_through(
            rnn.step, rnn.initial_state(2), x, "scan", params=params, graph_backward=graph
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
        assert entry.graph.replays == replays

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
    with pytest.raises(ValueError, match="direct method"):
        ffsolve.backprop_through(rnn.step, rnn.initial_state(2), x, "jacobi", graph_backward=True)
    with pytest.raises(TypeError, match="graph_backward must be"):
        ffsolve.backprop_through(rnn.step, rnn.initial_state(2), x, "scan", graph_backward=1)

    for T in range(3, 3 + bp.GRAPHED_CACHE + 2):  # new shapes: the least recent graphs go
        grads(torch.rand(2, T, 1, dtype=D64), True)
    assert len(bp._GRAPHED) == bp.GRAPHED_CACHE

    def broken(body, n):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bp, "_capture", broken)
    bp.clear_graphed_backwards()
    ref, _ = grads(x, False)
    with pytest.warns(RuntimeWarning, match="capturing the backward failed"):
        got, info = grads(x, True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert "graphed_backward" not in info.solution.stats  # the ordinary backward ran
