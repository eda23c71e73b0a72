"""No success reported for a failure, no half-finished work lost (the inputs of issue 21,
replayed): every one ends in a run or one line, a non-zero exit where something failed, no
orphan run folder and no measurement lost."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ffsolve
from ffsolve.cli import main
from ffsolve.data import logit_bounds
from ffsolve.experiments import EXPERIMENTS
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig
from ffsolve.problems import MADESampling, PixelCNNSampling, logistic_noise, pixelcnn_noise
from systems import chain

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("ffsolve:")]
    assert len(lines) == 1, err
    return lines[0]


def test_diverging_training_is_an_error_and_keeps_the_good_checkpoint(tmp_path, capsys):
    good = tmp_path / "made"
    save_made(good, MADE(MADEConfig(dims=784, hidden=(8,))), {"data": {"lam": 1e-6}})
    before = (tmp_path / "made.safetensors").read_bytes()
    sets = ["epochs=2", "max_train=500", "max_test=200", "hidden=[8]", "lr=1e30"]
    argv = ["train", "made", "--device", "cpu", "--out", str(tmp_path / "runs"), "--force"]
    argv += [x for s in [*sets, f"save_to={good}"] for x in ("--set", s)]
    assert main(argv) == 2
    assert "training diverged" in _one_line(capsys)
    assert (tmp_path / "made.safetensors").read_bytes() == before  # never over a good one
    load_made(good)  # still loads


def test_records_and_sidecars_are_strict_json(tmp_path):
    from ffsolve.checkpoint import strict_json
    from ffsolve.runs import write_json

    write_json(tmp_path / "r.json", {"a": [1.0, math.nan, -math.inf], "b": torch.tensor([2.0])})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [1.0, None, None], "b": [2.0]}  # a strict parser reads it
    assert "NaN" not in strict_json({"x": math.nan})


def test_saving_nan_weights_is_refused(tmp_path):
    made = MADE(MADEConfig(dims=4, hidden=(4,)))
    with torch.no_grad():
        made.layers[0].weight[0, 0] = math.nan
    with pytest.raises(ffsolve.errors.DivergedError, match="holds NaN or Inf"):
        save_made(tmp_path / "m", made)
    assert not list(tmp_path.iterdir())


def test_sizes_and_overrides_are_checked_before_anything_runs(tmp_path, capsys):
    out = ["--device", "cpu", "--out", str(tmp_path)]
    assert main(["run", "causal-net", "--set", "length=8", *out]) == 2
    assert "block_size=16 is larger than length=8" in _one_line(capsys)
    sets = ["--set", "block_size=100000", "--set", "batch=2"]
    assert main(["run", "made-sampling", *sets, *out]) == 2
    assert "larger than the model's 784 dimensions" in _one_line(capsys)
    assert main(["reproduce", "--override", "breakeven:nosuch=1", *out]) == 2
    assert "unknown config field(s) nosuch" in _one_line(capsys)
    assert main(["bench", "made-mnist", "--set", "checkpoint=/nonexistent/x", *out]) == 2
    assert "no checkpoint at /nonexistent/x" in _one_line(capsys)
    assert not any(tmp_path.rglob("*.json"))  # no orphan run folder


def test_an_unwritable_report_fails_before_the_first_step(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the report's folder should be
    argv = ["reproduce", "--steps", "breakeven", "--report", str(blocked / "R.md")]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "runs")]) == 2
    _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_records_of_another_experiment_get_one_line(tmp_path, capsys):
    out = ["--device", "cpu", "--out", str(tmp_path), "--quiet"]
    sets = ["length=6", "channels=1", "hidden=4", "batch=1", "block_size=2", "window=3"]
    assert main(["run", "causal-net", *[x for s in sets for x in ("--set", s)], *out]) == 0
    (run,) = (tmp_path / "causal-net").iterdir()
    capsys.readouterr()
    for step in ("made-mnist", "pixelcnn-mnist"):
        assert main(["reproduce", "--from", f"{step}={run}", *out]) == 2
        assert "needs a" in _one_line(capsys)
    records = json.loads((run / "records.json").read_text())
    del records["methods"]
    (run / "records.json").write_text(json.dumps(records))
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    assert "this version can draw" in _one_line(capsys)
    (run / "records.json").write_text("{not json")
    assert main(["plot", str(run)]) == 2
    assert "records.json is not a readable records file" in _one_line(capsys)


def test_plot_never_replaces_figures_unless_asked(tmp_path, capsys):
    out = ["--device", "cpu", "--out", str(tmp_path), "--quiet"]
    sets = ["length=6", "channels=1", "hidden=4", "batch=1", "block_size=2", "window=3"]
    assert main(["run", "causal-net", *[x for s in sets for x in ("--set", s)], *out]) == 0
    (run,) = (tmp_path / "causal-net").iterdir()
    figure = run / "convergence.png"
    stamp = figure.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["plot", str(run)]) == 2
    assert "--force" in _one_line(capsys) and figure.stat().st_mtime_ns == stamp
    assert main(["plot", str(run), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "convergence.png").is_file()
    assert main(["plot", str(run), "--force"]) == 0


def test_plot_with_nothing_to_draw_says_so(tmp_path, capsys, monkeypatch):
    """Records whose experiment draws no figure from them: a one-line error, not a silent 0,
    and no empty --out folder left behind."""
    out = ["--device", "cpu", "--out", str(tmp_path), "--quiet"]
    sets = ["length=6", "channels=1", "hidden=4", "batch=1", "block_size=2", "window=3"]
    assert main(["run", "causal-net", *[x for s in sets for x in ("--set", s)], *out]) == 0
    (run,) = (tmp_path / "causal-net").iterdir()
    capsys.readouterr()
    blank = dataclasses.replace(EXPERIMENTS["causal-net"], plot=lambda records, out_dir: [])
    monkeypatch.setitem(EXPERIMENTS, "causal-net", blank)
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 2
    assert "no figures to draw" in _one_line(capsys)
    assert not (tmp_path / "figs").exists()


def _partial_run(tmp_path, sig):
    """A long run (break-even rows, one per length) stopped by `sig` after its first rows."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ffsolve", "run", "breakeven", "--device", "cpu", "--out",
           str(tmp_path), "--set", "lengths=[8, 8, 8, 8, 8, 8, 4000]", "--set", "batches=[1]",
           "--set", "repeats=2"]  # fmt: skip
    proc = subprocess.Popen(  # SIGINT as a terminal sends it, even where the tests run in the
        cmd,  # background of a shell (which starts them with SIGINT ignored)
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        kept = list(tmp_path.rglob("partial.jsonl"))
        if kept and len(kept[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_keeps_what_it_measured(tmp_path, sig):
    code, err = _partial_run(tmp_path, sig)
    assert code == (143 if sig == signal.SIGTERM else 130) and "Traceback" not in err, err
    assert "finished row(s) are kept in" in err and "interrupted" in err
    (run,) = (tmp_path / "breakeven").iterdir()
    records = json.loads((run / "records.json").read_text())
    assert records["interrupted"] and len(records["partial_rows"]) >= 2
    assert not (run / "partial.jsonl").exists()


def test_progress_lines_reach_logs(monkeypatch, capsys):
    from ffsolve import progress

    monkeypatch.setattr(progress, "enabled", lambda: False)
    progress.set_quiet(False)
    assert list(progress.track(range(3), desc="epochs", unit="epoch")) == [0, 1, 2]
    assert list(progress.track(range(3), desc="batches", lines=False)) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[epochs: epoch 1/3 done") and len(err) == 3
    progress.set_quiet(True)
    list(progress.track(range(3), desc="epochs"))
    assert capsys.readouterr().err == ""
    progress.set_quiet(False)


def test_the_library_checks_its_inputs():
    made = MADE(MADEConfig(dims=6, hidden=(8,)))
    noise = logistic_noise(2, 6, torch.Generator().manual_seed(0))
    lo, hi = logit_bounds(1e-6)
    with pytest.raises(ValueError, match="lo < hi"):
        MADESampling(made, noise, (hi, lo))
    bad = noise.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"noise holds NaN or Inf \(first at index \(1, 3\)\)"):
        MADESampling(made, bad, (lo, hi))
    net = PixelCNNpp(PixelCNNppConfig(channels=1, height=4, width=4, filters=4, resnets=1,
                                      mixtures=2)).eval()  # fmt: skip
    g, e = pixelcnn_noise(1, (1, 4, 4), 2, torch.Generator().manual_seed(0))
    g[0, 1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="gumbel noise holds NaN"):
        PixelCNNSampling(net, g, e)
    with pytest.raises(ValueError, match="A holds NaN"):
        ffsolve.linear_scan(torch.full((1, 3, 2), math.nan), torch.zeros(1, 3, 2))


def test_verify_finds_a_non_causal_function():
    x0 = torch.zeros(2, 12, dtype=torch.float64)
    sol = ffsolve.solve(chain, x0, verify=True)
    assert sol.stats["verify"]["fixed_point"] and sol.stats["verify"]["causal"]

    def peeks(x):  # position t reads position t + 1: not a triangular system
        return torch.tanh(0.5 * x.roll(-1, 1) + 0.3)

    with pytest.warns(ffsolve.VerificationWarning, match="not causal"):
        ffsolve.solve(peeks, x0, verify=True, max_iters=200)
    report = ffsolve.verify(ffsolve.FunctionProblem(chain, x0), torch.zeros_like(x0))
    assert not report.fixed_point and "position 0" in report.findings[0]


def test_the_rgb_stand_in_refuses_too_few_photos():
    from ffsolve.data import load_rgb_crops
    from ffsolve.errors import DataError

    with pytest.raises(DataError, match=r"needs 99 photos.*pip install -e \.\[rgb\]"):
        load_rgb_crops(num_train=4, num_test=2, photos=99)


def test_rough_edges(tmp_path, capsys):
    out = ["--device", "cpu", "--out", str(tmp_path)]
    assert main(["run", "nope", "--traceback", *out]) == 2  # accepted after the command
    capsys.readouterr()
    (tmp_path / "dup.yaml").write_text("length: 8\nlength: 9\n")
    assert main(["run", "causal-net", "--config", str(tmp_path / "dup.yaml"), *out]) == 2
    assert "dup.yaml" in (line := _one_line(capsys)) and "given twice" in line
    (tmp_path / "latin.yaml").write_bytes(b"length: \xe9\n")
    assert main(["run", "causal-net", "--config", str(tmp_path / "latin.yaml"), *out]) == 2
    assert "latin.yaml is not UTF-8" in _one_line(capsys)
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    line = next(x for x in listing.splitlines() if x.strip().startswith("jacobi_gs"))
    assert line.rstrip().endswith(".")  # a whole sentence
    assert "rnn-forward" in listing and "bench cases" in listing


def test_verify_allows_one_steps_rounding_not_more():
    """An exact solve whose f_t, evaluated one position at a time, rounds differently from
    the sweep (other shapes, another BLAS path) is not reported; an error of a few thousand
    ulps is."""
    x0 = torch.zeros(2, 12, dtype=torch.float32)
    value = ffsolve.solve(chain, x0).value
    problem = ffsolve.FunctionProblem(chain, x0)
    ulp = torch.finfo(torch.float32).eps
    nudged = value.clone()
    nudged[:, 5] += 4 * ulp * value[:, 5].abs().clamp(min=1)  # rounding-sized
    assert ffsolve.verify(problem, nudged, positions=12).fixed_point
    nudged[:, 5] += 4000 * ulp  # far beyond one step's rounding
    report = ffsolve.verify(problem, nudged, positions=12)
    assert not report.fixed_point and "position 5" in report.findings[0]


@pytest.mark.parametrize("bad", ["[.inf]", "[0.1, -.inf]", "[.nan]", "[-0.1]"])
def test_non_finite_or_negative_tolerances_are_refused_up_front(tmp_path, capsys, bad):
    # was: tolerances=[.inf] passed the config check (inf >= 0) and failed mid-run
    argv = ["run", "diffusion-sampling", "--set", f"tolerances={bad}", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert "DiffusionSamplingConfig.tolerances=" in line and "allowed finite numbers >= 0" in line
    assert not any(tmp_path.rglob("*.json"))  # nothing started


def test_bounded_config_numbers_must_be_finite():
    from ffsolve.errors import ConfigError
    from ffsolve.experiments.pixelcnn_sampling import PixelCNNSamplingConfig

    with pytest.raises(ConfigError, match=r"atol=inf is out of range: allowed finite numbers"):
        PixelCNNSamplingConfig(atol=math.inf)
    assert PixelCNNSamplingConfig(atol=1e300).atol == 1e300
