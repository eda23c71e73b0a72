"""`ffsolve bench`: cases declared by the experiments, each run in its own run directory."""

import json

import pytest
import torch

from ffsolve.cli import main
from ffsolve.models.made import MADE, MADEConfig, save_made
from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig, save_pixelcnnpp


def _bench(tmp_path, cases, sets):
    argv = ["bench", *cases, "--device", "cpu", "--out", str(tmp_path / "runs"), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    (folder,) = (tmp_path / "runs" / "bench").iterdir()
    index = json.loads((folder / "bench.json").read_text())
    records = {
        name: json.loads((folder / name / "records.json").read_text())
        for name, e in index["cases"].items()
        if e["status"] == "done"
    }
    return code, index, records


def test_made_and_rnn_cases_run_side_by_side(tmp_path, capsys):
    ckpt = tmp_path / "made_tiny"
    made = MADE(MADEConfig(dims=12, hidden=(16, 16), seed=0))
    save_made(ckpt, made, {"data": {"lam": 1e-6, "shape": [1, 3, 4]}})
    made_sets = [f"checkpoint={ckpt}", "batch=2", "block_size=3", "window=6"]
    sets = ["repeats=1", "warmup=0"]
    sets += [f"made-mnist:{s}" for s in made_sets]
    sets += [f"made-batch:{s}" for s in (*made_sets, "batches=[1, 2]")]
    sets += ["rnn-backprop:lengths=[6]", "rnn-backprop:hidden=4", "rnn-backprop:budget=3"]
    code, index, rec = _bench(tmp_path, ["made-mnist", "made-batch", "rnn-backprop"], sets)
    assert code == 0 and all(e["status"] == "done" for e in index["cases"].values())
    rows = {r["method"]: r for r in rec["made-mnist"]["methods"]}
    assert not any("error" in r for r in rows.values())
    # eager and captured rows of every method (on a CPU "auto" is eager too)
    for label in ("jacobi", "jacobi (eager)", "sequential-naive", "jacobi_gs(block=3)"):
        assert rows[label]["equal_to_sequential"], label  # same kernels as the naive loop
    assert rows["jacobi"]["strongest_baseline"].startswith("sequential")
    assert {"wall_time_s", "min_s", "max_s", "peak_mem_mb", "mem_before_mb"} <= set(rows["jacobi"])
    assert "strips" not in rec["made-mnist"]  # the bench records no traces
    assert [e["batch"] for e in rec["made-batch"]["batch_sweep"]] == [1, 2]
    (entry,) = rec["rnn-backprop"]["lengths"]
    rnn = {r["method"]: r for r in entry["rows"]}
    assert rnn["autograd BPTT"]["relative_grad_error"] == 0.0
    assert rnn["jacobi rtol=1e-6"]["relative_grad_error"] < 1e-5
    assert rnn["scan"]["relative_grad_error"] < 1e-5  # exact up to rounding
    assert rnn["jacobi forward atol 1e-5 + scan"]["relative_grad_error"] < 1e-4
    assert "speed-ups against autograd's BPTT" in capsys.readouterr().out


def test_a_failing_case_is_recorded_and_the_exit_code_says_so(tmp_path, capsys):
    ckpt = tmp_path / "made_tiny"
    save_made(ckpt, MADE(MADEConfig(dims=12, hidden=(16,))), {"data": {"lam": 1e-6, "shape": [12]}})
    # block_size larger than the model's 12 dimensions: found once the model is loaded
    sets = [f"made-mnist:checkpoint={ckpt}", "made-mnist:block_size=100", "breakeven:lengths=[4]"]
    sets += ["breakeven:batches=[1]", "breakeven:repeats=1"]
    code, index, rec = _bench(tmp_path, ["made-mnist", "breakeven"], sets)
    assert code == 1
    assert index["cases"]["made-mnist"]["status"] == "failed"
    assert "larger than the model's 12 dimensions" in index["cases"]["made-mnist"]["error"]
    assert index["cases"]["breakeven"]["status"] == "done" and "rows" in rec["breakeven"]
    assert "bench: failed: made-mnist" in capsys.readouterr().err


def test_bad_overrides_fail_before_any_case_runs(tmp_path, capsys):
    argv = ["bench", "breakeven", "made-mnist", "--set", "made-mnist:nosuch=1"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "bench case made-mnist" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()  # nothing ran
    argv = ["bench", "breakeven", "made-rgb", "--set", f"made-rgb:checkpoint={tmp_path / 'no'}"]
    assert main([*argv, "--out", str(tmp_path)]) == 2  # a missing checkpoint: found first
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "breakeven", "--set", "nope:x=1", "--out", str(tmp_path)]) == 2


def test_pixelcnn_case(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny"
    cfg = PixelCNNppConfig(channels=1, height=8, width=8, filters=4, resnets=1, mixtures=2)
    save_pixelcnnpp(ckpt, PixelCNNpp(cfg).eval(), {"data": {"name": "random"}})
    sets = [f"checkpoint={ckpt}", "batch=2", "window_rows=2", "repeats=1", "warmup=0"]
    code, _, rec = _bench(tmp_path, ["pixelcnn-mnist"], sets)
    assert code == 0
    by = {r["method"]: r for r in rec["pixelcnn-mnist"]["methods"]}
    assert set(by) == {
        "sequential",
        "sequential-cached",
        "jacobi",
        "jacobi_gs(row=8)",
        "gs_jacobi(window=2 rows)",
    }
    assert all("error" not in r for r in by.values())
    assert by["jacobi"]["equal_to_sequential"]  # same kernels as the plain loop: bitwise
    assert by["sequential-cached"]["max_abs_diff_vs_sequential"] < 1e-4  # crops: rounding
    assert by["jacobi"]["strongest_baseline"] in ("sequential", "sequential-cached")


@pytest.mark.slow
def test_densenet_case_on_the_shipped_checkpoint(tmp_path):
    """The DenseNet bench case on the shipped DenseNet-BC (noise inputs, no data set): exact
    Jacobi agrees with the forward to rounding within T sweeps; the tolerance stops earlier."""
    code, _, rec = _bench(tmp_path, ["densenet"], ["batches=[1]", "repeats=1", "warmup=0"])
    assert code == 0
    (entry,) = rec["densenet"]["batches"]
    rows = {r["method"]: r for r in entry["rows"]}
    assert not any("error" in r for r in rows.values())
    exact = rows["jacobi fused-unfold sweep, exact"]
    tol = rows["jacobi fused-unfold sweep, atol=0.001"]
    assert exact["num_iters"] <= 48 and exact["max_abs_diff_vs_sequential"] < 1e-4
    assert tol["num_iters"] < exact["num_iters"]
    assert rows["sequential forward (eager)"]["strongest_baseline"] == "sequential forward (eager)"


def test_rnn_forward_case_maps_the_winners(tmp_path, capsys):
    sets = ["hidden=[4]", "lengths=[40, 80]", "batches=[2]", "repeats=1"]
    code, _, rec = _bench(tmp_path, ["rnn-forward"], sets)
    assert code == 0
    win = rec["rnn-forward"]["winners"]
    assert [(w["cell"], w["length"]) for w in win] == [
        ("gru", 40), ("gru", 80), ("lstm", 40), ("lstm", 80)
    ]  # fmt: skip
    for w in win:  # on a CPU there is no cuDNN row: the fastest is a parallel method
        assert w["winner"] in ("jacobi", "quasi_newton") and w["best_parallel_vs_cudnn"] is None
        rows = [
            r for r in rec["rnn-forward"]["rows"]
            if (r["cell"], r["length"]) == (w["cell"], w["length"])
        ]  # fmt: skip
        assert w["time_s"] == min(r["time_s"] for r in rows if "time_s" in r)
    assert "where each method wins" in capsys.readouterr().out


def test_a_kept_row_carries_its_comparison_with_the_reference():
    """An interrupted run keeps rows as they finish: each row after the reference is kept
    with its difference to it (rows before the reference get theirs at the end)."""
    from ffsolve.bench import Outcome, Row, timed_rows

    def row(label, kind, value):
        return Row(label, kind, lambda: Outcome(torch.tensor(value), 1, {}))

    kept = []
    rows = [row("early", "parallel", [1.0, 2.5]), row("sequential", "sequential", [1.0, 2.0]),
            row("late", "parallel", [1.0, 2.0])]  # fmt: skip
    records, _ = timed_rows(
        rows, torch.device("cpu"), warmup=0, repeats=1, keep=lambda r: kept.append(dict(r))
    )  # as written at once
    assert "max_abs_diff_vs_sequential" not in kept[0]  # no reference yet when it was kept
    assert kept[2]["max_abs_diff_vs_sequential"] == 0.0 and kept[2]["equal_to_sequential"]
    assert records[0]["max_abs_diff_vs_sequential"] == 0.5  # filled in at the end
