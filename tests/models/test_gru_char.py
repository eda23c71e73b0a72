"""The character GRU trainer and rnn-forward on its trained cell (tiny, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

import ffsolve
from ffsolve.cli import main
from ffsolve.data import TEXT_VOCAB, decode_text, encode_text
from ffsolve.models.char_gru import load_char_gru
from ffsolve.problems import RecurrenceForward

_TEXT = "the quick brown fox jumps over the lazy dog; " * 9 + "é\n"  # 407 chars, one non-ASCII


def _sets(pairs):
    return [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GRU trained for a few steps via the CLI: (records, checkpoint stem)."""
    tmp = tmp_path_factory.mktemp("gru")
    text = tmp / "text.txt"
    text.write_text(_TEXT, encoding="utf-8")
    stem = tmp / "ckpt"
    sets = {
        "text_file": text,
        "save_to": stem,
        "hidden": 8,
        "chunk": 16,
        "batch_size": 4,
        "epochs": 4,
        "lr": 0.03,
        "valid_fraction": 0.2,
        "heldout_chars": 50,
    }
    argv = ["--quiet", "train", "gru", "--device", "cpu", "--out", str(tmp / "runs")]
    assert main(argv + _sets(sets)) == 0
    (run,) = (tmp / "runs" / "gru").iterdir()
    return json.loads((run / "records.json").read_text()), stem


def test_text_encoding_round_trips_with_one_other_symbol():
    ids = encode_text("a\tb\n~ é")
    assert ids.tolist()[-1] == len(TEXT_VOCAB)  # non-ASCII: the "other" symbol
    assert decode_text(ids) == "a\tb\n~ \ufffd"


def test_trainer_runs_end_to_end_and_its_loss_falls(trained):
    records, stem = trained
    h = records["history"]
    assert [e["epoch"] for e in h] == [0, 1, 2, 3, 4]
    assert h[-1]["valid_bpc"] < h[0]["valid_bpc"] - 1.0  # from ~log2(98) bits, a big drop
    assert h[-1]["train_bpc"] < h[1]["train_bpc"]
    model, heldout, meta = load_char_gru(stem)
    assert model.config.hidden == 8 and meta["kind"] == "gru-char"
    assert meta["valid_bits_per_char"] == pytest.approx(h[-1]["valid_bpc"])
    n_valid = int(len(_TEXT) * 0.2)
    assert torch.equal(heldout, encode_text(_TEXT[-n_valid:])[:50])  # the held-out tail
    assert not stem.with_name("ckpt.resume.pt").exists()  # finished: nothing to resume


def test_trained_cell_is_the_trained_gru_and_every_method_equals_sequential(trained):
    _, stem = trained
    model, heldout, _ = load_char_gru(stem)
    model = model.double()
    xs = model.one_hot(heldout[:45].reshape(3, 15))  # (3, 15, 98)
    h0 = torch.zeros(3, 8, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = model.gru(xs, h0[None])  # (3, 15, 8): nn.GRU, the trained module itself
        problem = RecurrenceForward(model.cell(), h0, xs)
        seq = problem.states(ffsolve.solve(problem, method="sequential").value)
        torch.testing.assert_close(seq, ref, rtol=1e-12, atol=1e-12)
        for method in ("jacobi", "newton", "quasi_newton"):
            sol = ffsolve.solve(problem, method=method, atol=1e-12)
            assert sol.all_converged and sol.num_iters <= 15
            torch.testing.assert_close(problem.states(sol.value), seq, rtol=0, atol=1e-10)


def test_rnn_forward_with_a_checkpoint_runs_end_to_end(trained, tmp_path, capsys):
    _, stem = trained
    sets = {
        "checkpoint": stem,
        "cells": "[gru]",
        "lengths": "[1,70]",  # 70 > 50 held-out characters: the text repeats
        "batches": "[3]",
        "repeats": 1,
        "warmup": 0,
        "dtype": "float64",
        "atol": 1e-12,
        "methods": "[cudnn,sequential,jacobi,newton,quasi_newton]",
    }
    argv = ["run", "rnn-forward", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv + _sets(sets)) == 0
    (run,) = (tmp_path / "rnn-forward").iterdir()
    records = json.loads((run / "records.json").read_text())
    assert records["weights"] == "trained" and records["checkpoint"]["hidden"] == 8
    rows = records["rows"]
    assert all(r["weights"] == "trained" and r["hidden"] == 8 for r in rows)
    assert {r["method"] for r in rows} == {
        "cudnn",
        "sequential",
        "jacobi",
        "newton",
        "quasi_newton",
    }
    for r in rows:
        if r["method"] == "cudnn":
            assert r["skipped"] == "no cuDNN on cpu" and "time_s" not in r
        elif r["method"] != "sequential":
            assert r["converged"] and r["iters"] <= r["length"] and r["max_diff"] < 1e-10
    out = capsys.readouterr().out
    assert "weights: trained" in out and "no cuDNN on cpu" in out


def test_rnn_forward_inputs_are_the_held_out_text_repeated(trained):
    from ffsolve.experiments.rnn_forward import _Trained

    _, stem = trained
    t = _Trained(str(stem), torch.device("cpu"), torch.float32)
    xs = t.inputs(3, 70)  # (3, 70, 98)
    assert xs.shape == (3, 70, 98) and torch.all(xs.sum(-1) == 1)
    N = len(t.heldout)
    for b in range(3):
        want = t.heldout[(b * (N // 3) + torch.arange(70)) % N]
        assert torch.equal(xs[b].argmax(-1), want)


@pytest.mark.parametrize(
    "bad", ["cells=[gru,lstm]", "hidden=[16]", "input_size=5", "weight_scale=2.0"]
)
def test_rnn_forward_checkpoint_refuses_conflicting_settings(trained, tmp_path, capsys, bad):
    _, stem = trained
    argv = ["run", "rnn-forward", "--device", "cpu", "--out", str(tmp_path)]
    argv += ["--set", f"checkpoint={stem}", "--set", "lengths=[5]", "--set", bad]
    if not bad.startswith("cells"):
        argv += ["--set", "cells=[gru]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffsolve: error:") and len(err.splitlines()) == 1
    assert not any(tmp_path.rglob("records.json"))


def test_train_gru_refuses_a_missing_text_file(tmp_path, capsys):
    argv = ["train", "gru", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv + ["--set", f"text_file={tmp_path / 'none.txt'}"]) == 2
    assert "not found" in capsys.readouterr().err
