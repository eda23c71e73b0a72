"""`ffsolve reproduce`: the steps the experiments declare, one report beside the paper."""

import torch

from ffsolve.cli import main
from ffsolve.models.made import MADE, MADEConfig, save_made
from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig, save_pixelcnnpp


def test_tiny_report(tmp_path, capsys):
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
    argv += ["--override", "breakeven:lengths=[8]", "--override", "breakeven:batches=[1]"]
    # a missing checkpoint is found before the first step runs
    assert main([*argv, "--rgb-checkpoint", str(tmp_path / "absent")]) == 2
    assert "reproduce step made-rgb: made-sampling: no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    rgb = [f"checkpoint={ckpt}", "batch=2", "repeats=1", "block_size=3", "window=4", "trace=false"]
    argv += [x for s in rgb for x in ("--override", f"made-rgb:{s}")]
    assert main(argv) == 0
    (report_dir,) = (tmp_path / "runs" / "reproduce").iterdir()
    text = (report_dir / "REPORT.md").read_text()
    assert "| made-mnist | Jacobi iterations | 31 |" in text
    assert "| made-rgb | Jacobi iterations | 92 |" in text
    assert "rnn-backprop" in text and "## breakeven" in text
    assert main(["reproduce", "--override", "nope:x=1", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--steps", "nope", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--from", f"made-mnist={tmp_path}", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    empty = tmp_path / "empty"  # a folder without the data set's files
    empty.mkdir()
    argv = ["reproduce", "--steps", "densenet-bc", "--fmnist-dir", str(empty)]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err  # missing data: one line, the next step would still run
    assert "densenet-bc failed: " in err and "lacks train-images" in err
    assert "Traceback" not in err
    (bad,) = (tmp_path / "bad" / "reproduce").iterdir()
    assert "failed: DataError" in (bad / "REPORT.md").read_text()


def test_bad_override_fails_before_any_step_runs(tmp_path, capsys):
    argv = ["reproduce", "--steps", "breakeven", "made-mnist", "--out", str(tmp_path)]
    assert main([*argv, "--override", "made-mnist:nosuch=1"]) == 2
    assert "reproduce step made-mnist" in capsys.readouterr().err
    assert not (tmp_path / "breakeven").exists()  # nothing ran


def test_report_from_earlier_runs(tmp_path, capsys):
    """--from puts a report together from runs made earlier (as in several GPU calls): the
    PixelCNN++ and DenseNet rows beside the paper's, figure links relative to --report."""
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
    capsys.readouterr()
    # the records of another experiment: one line saying what was expected
    argv = ["reproduce", "--from", f"pixelcnn-mnist={ddir}", "--report", str(report)]
    assert main([*argv, *common]) == 2
    assert "needs a 'pixelcnn-sampling' run" in capsys.readouterr().err
