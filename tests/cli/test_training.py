"""The one training loop (ffsolve.training) through every trainer: divergence refusals, what
an interruption says, and the exit codes of SIGTERM and SIGINT (tiny, CPU, seconds)."""

from __future__ import annotations

import importlib
import math
import os
import shlex
import signal

import pytest
import torch

from ffsolve import cli, training
from ffsolve.cli import main
from ffsolve.errors import DivergedError
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from idx_files import idx_folder

_TEXT = "the quick brown fox jumps over the lazy dog; " * 9


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _tiny(name: str, tmp_path) -> list[str]:
    """The config overrides of a tiny run of trainer `name`."""
    if name == "made":
        return ["data=rgb", "hidden=[16]", "lam=0.05", "epochs=2", "rgb_train=100",
                "rgb_test=20", "rgb_photos=1", "batch_size=50", "lr=3e-3"]  # fmt: skip
    if name == "pixelcnnpp":
        return ["data=rgb", "rgb_train=16", "rgb_test=4", "rgb_photos=1", "filters=4",
                "resnets=1", "mixtures=2", "batch_size=8", "epochs=1"]  # fmt: skip
    if name == "densenet":
        data = idx_folder(tmp_path / "fmnist", 32, 8)
        return ["depth=10", "growth_rate=2", "epochs=1", "batch_size=16", f"data_dir={data}"]
    if name == "gru":
        text = tmp_path / "text.txt"
        text.write_text(_TEXT, encoding="utf-8")
        return [f"text_file={text}", "hidden=8", "chunk=16", "batch_size=4", "epochs=1",
                "valid_fraction=0.2", "heldout_chars=20"]  # fmt: skip
    pytest.importorskip("diffusers")
    data = idx_folder(tmp_path / "fmnist", 8, 4)
    return ["block_out_channels=[8,16]", "layers_per_block=1", "attention=false",
            "norm_num_groups=8", "batch_size=4", "eval_images=4", "max_minutes=0",
            "lr_warmup=0", "max_steps=2", "data=fashion-mnist", f"data_dir={data}"]  # fmt: skip


TRAINERS = {
    "made": "made_train",
    "pixelcnnpp": "pixelcnn_train",
    "densenet": "densenet_train",
    "gru": "gru_char_train",
    "ddpm": "ddpm_train",
}


def _train(name: str, tmp_path, stem: str, *extra: str, sets: tuple[str, ...] = ()) -> int:
    argv = ["--quiet", "train", name, "--device", "cpu", "--out", str(tmp_path / "runs")]
    return main(argv + _sets([*_tiny(name, tmp_path), f"save_to={tmp_path / stem}", *sets])
                + list(extra))  # fmt: skip


def _evaluations(monkeypatch, module, change):
    """Make trainer `module` build its Task with an evaluation whose n-th result (1: the
    model before training) goes through change(n, metrics)."""
    real = training.Task

    def make(**kw):
        evaluate, calls = kw["evaluate"], []

        def changed(model):
            calls.append(1)
            return change(len(calls), evaluate(model))

        return real(**{**kw, "evaluate": changed})

    monkeypatch.setattr(module, "Task", make)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_finite_divergence_is_refused_by_every_trainer(tmp_path, monkeypatch, capsys, name):
    # was: exit 0 and a checkpoint far worse than the untrained model (only NaN/Inf caught)
    module = importlib.import_module(f"ffsolve.experiments.{TRAINERS[name]}")
    _evaluations(
        monkeypatch, module, lambda n, m: m if n == 1 else {k: 3 * v for k, v in m.items()}
    )
    assert _train(name, tmp_path, "bad") == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ffsolve:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "training diverged" in lines[0] and "2x worse than the model before training" in err
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.safetensors").exists()


def test_the_issue_s_lr_10_made_run_is_refused(tmp_path, capsys):
    # the issue: lr=10 ended at 2.5e11 bits/dim (from 8.08), exit 0, a checkpoint saved
    sets = ["lr=10", "lr_final=0", "epochs=1"]
    assert _train("made", tmp_path, "m", sets=tuple(sets)) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_force_never_replaces_a_far_better_checkpoint(tmp_path, monkeypatch, capsys):
    import ffsolve.experiments.made_train as mt

    assert _train("made", tmp_path, "good") == 0
    before = (tmp_path / "good.safetensors").read_bytes()
    # the checkpoint --force would replace measures (2nd evaluation) far better than the run
    _evaluations(monkeypatch, mt, lambda n, m: {k: v / 10 for k, v in m.items()} if n == 2 else m)
    assert _train("made", tmp_path, "good", "--force") == 2
    err = capsys.readouterr().err
    assert "worse than the checkpoint it would replace" in err and "another save_to" in err
    assert (tmp_path / "good.safetensors").read_bytes() == before
    assert _train("made", tmp_path, "other") == 0  # saved elsewhere: nothing to replace
    monkeypatch.undo()
    assert _train("made", tmp_path, "good", "--force") == 0  # no better: replaced


def test_a_checkpoint_of_another_shape_is_no_reference(tmp_path, capsys):
    save_made(tmp_path / "m", MADE(MADEConfig(dims=5, hidden=(4,))), {"data": {"lam": 0.05}})
    assert _train("made", tmp_path, "m", "--force") == 0
    assert "not comparable" in capsys.readouterr().out
    assert load_made(tmp_path / "m")[0].dims == 3072


def test_the_rule():
    refs = [("start", 8.0)]
    training.check_diverged(16.0, refs, "test_bpd")  # twice as bad: kept
    training.check_diverged(None, refs, "test_bpd")  # no test set: nothing to judge
    for bad in (16.01, math.inf, math.nan):
        with pytest.raises(DivergedError, match="more than 2x worse than start"):
            training.check_diverged(bad, refs, "test_bpd")
    training.check_diverged(-0.5, [("start", -1.0)], "x")  # negative losses: by |ref|
    with pytest.raises(DivergedError):
        training.check_diverged(0.1, [("start", -1.0)], "x")


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import ffsolve.experiments.made_train as mt

    def stop_in_epoch_2(n, metrics):  # the model before training, after epoch 1, ...
        if n == 3:
            raise KeyboardInterrupt
        return metrics

    _evaluations(monkeypatch, mt, stop_in_epoch_2)
    argv = ["--quiet", "train", "made", "--device", "cpu", "--out", str(tmp_path / "runs")]
    argv += _sets(_tiny("made", tmp_path))  # no save_to: the hint names the run's own
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ffsolve: interrupted; resume from ") and "--resume" in err, err
    command = shlex.split(err.split(" with: ", 1)[1])
    assert command[0] == "ffsolve" and "--set" in command and command[-1] == "--resume"
    monkeypatch.undo()
    assert main(command[1:]) == 0  # the printed command resumes
    (stem,) = (a.split("=", 1)[1] for a in command if a.startswith("save_to="))
    _, meta = load_made(stem)
    assert meta["epochs"] == 2 and not list((tmp_path / "runs").rglob("*.resume.pt"))
    # stopped before the first save: nothing to resume from, and it says so
    _evaluations(monkeypatch, mt, lambda n, m: stop_in_epoch_2(n + 2, m))
    assert main(argv) == 130
    assert "nothing was saved to resume from" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["list"], ["run", "causal-net"], ["train", "made"],
                                     ["bench"], ["reproduce"]])  # fmt: skip
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_exits_143_and_sigint_130_for_every_command(monkeypatch, capsys, command, sig,
                                                             code):  # fmt: skip
    def killed(args):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(cli, "_dispatch", killed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(command) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "ffsolve: interrupted" in err and "Traceback" not in err
    assert ("SIGTERM" in err) == (sig == signal.SIGTERM)


def test_resume_restores_the_ema_and_the_position_in_the_epoch(tmp_path, monkeypatch):
    """A run killed mid-epoch (DDPM saves every step here) resumes bitwise."""
    pytest.importorskip("diffusers")
    sets = ("max_steps=3", "save_every_minutes=1e-9", "max_train=6")  # 2 batches an epoch
    assert _train("ddpm", tmp_path, "straight", sets=sets) == 0
    save, calls = training.save_train_state, []

    def killed_after_first_save(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_train_state", killed_after_first_save)
    assert _train("ddpm", tmp_path, "split", sets=sets) == 130  # after step 1: mid-epoch
    monkeypatch.undo()
    assert _train("ddpm", tmp_path, "split", "--resume", sets=sets) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "split.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
