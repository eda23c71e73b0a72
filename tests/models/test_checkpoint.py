import json

import pytest
import torch

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.errors import CheckpointError


def test_roundtrip_and_errors(tmp_path):
    t = {"w": torch.randn(3, 4), "mask": torch.ones(4, dtype=torch.bool)}
    path = save_checkpoint(tmp_path / "m", "made", t, {"hidden": [8]})
    tensors, meta = load_checkpoint(path, "made")
    assert torch.equal(tensors["w"], t["w"]) and meta["config"] == {"hidden": [8]}
    with pytest.raises(CheckpointError, match="expected 'pixelcnn'"):
        load_checkpoint(tmp_path / "m", "pixelcnn")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "other", "made")
    # corrupt one byte of the tensors
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, "made")
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    meta["format_version"] = 99
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path, "made")
    side.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path, "made")


def test_train_state_refuses_other_training_settings(tmp_path):
    import pytest
    import torch

    from ffsolve.checkpoint import load_train_state, save_train_state
    from ffsolve.errors import CheckpointError, ConfigError

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "m.resume.pt"
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    save_train_state(path, model, opt, None, 3, config={"lr": 0.1, "hidden": 8}, generator=g)
    expected = torch.rand(4, generator=g)  # what the data generator draws next
    g2 = torch.Generator().manual_seed(0)
    state = load_train_state(path, model, opt, config={"lr": 0.1, "hidden": 8}, generator=g2)
    assert state["epoch"] == 3
    assert torch.equal(torch.rand(4, generator=g2), expected)  # the generator resumes too
    with pytest.raises(ConfigError, match="other values of: hidden"):
        load_train_state(path, model, opt, config={"lr": 0.1, "hidden": 16})
    save_train_state(path, model, opt, None, 3)  # saved without a generator
    with pytest.raises(CheckpointError, match="no data generator state"):
        load_train_state(path, model, opt, generator=g2)


def test_an_explicit_commit_wins_over_the_checkout(monkeypatch):
    import torch

    from ffsolve.runs import environment

    monkeypatch.setenv("FFSOLVE_COMMIT", "abc1234")
    assert environment(torch.device("cpu"))["commit"] == "abc1234"
    monkeypatch.delenv("FFSOLVE_COMMIT")
    assert environment(torch.device("cpu"))["commit"] != "abc1234"


def _made_with_sidecar(tmp_path, edit):
    """A tiny MADE checkpoint whose sidecar `edit(meta)` changes; returns its stem."""
    from ffsolve.models.made import MADE, MADEConfig, save_made

    data = {"name": "mnist", "shape": [2, 2], "lam": 1e-6}
    save_made(tmp_path / "m", MADE(MADEConfig(dims=4, hidden=(8,))), {"data": data})
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    edit(meta)
    side.write_text(json.dumps(meta))
    return tmp_path / "m"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("config"), "the sidecar has no 'config'"),
        (lambda m: m.update(config=[4]), "'config' must be a mapping"),
        (lambda m: m.pop("data"), "the sidecar has no 'data'"),
        (lambda m: m["data"].pop("lam"), "the sidecar has no 'data.lam'"),
        (lambda m: m["data"].update(lam=-1), r"'data.lam' must be a number in \(0, 0.5\)"),
        (lambda m: m["data"].update(lam="abc"), "'data.lam' must be a number.*'abc'"),
        (lambda m: m["data"].update(lam=None), "'data.lam' must be a number"),
        (lambda m: m["data"].update(shape=[2, 0]), "'data.shape' must be a non-empty list"),
        (lambda m: m.update(data="mnist"), "'data' must be a mapping"),
    ],
)
def test_a_bad_sidecar_is_one_error_naming_the_file_and_key(tmp_path, edit, message):
    # was: KeyError 'config' from load_made, 'math domain error' / 'could not convert
    # string to float' for data.lam, naming no file
    from ffsolve.models.made import load_made

    stem = _made_with_sidecar(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        load_made(stem, require=("data.lam", "data.shape"))
    assert str(tmp_path / "m.json") in str(info.value)


def test_sidecar_fields_are_required_only_where_read(tmp_path):
    from ffsolve.models.made import load_made

    stem = _made_with_sidecar(tmp_path, lambda m: m.pop("data"))
    load_made(stem)  # the model alone needs no data description
    with pytest.raises(ValueError, match="unknown sidecar field 'data.lamda'"):
        load_made(stem, require=("data.lamda",))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("config"), "has no 'config'"),
        (lambda m: m.pop("data"), "has no 'data'"),
        (lambda m: m["data"].update(lam=-1), "'data.lam' must be a number in"),
        (lambda m: m["data"].update(lam="abc"), "'data.lam' must be a number in"),
    ],
)
def test_the_cli_reports_a_bad_sidecar_in_one_line(tmp_path, capsys, edit, message):
    import re

    from ffsolve.cli import main

    stem = _made_with_sidecar(tmp_path, edit)
    argv = ["run", "made-sampling", "--device", "cpu", "--out", str(tmp_path / "runs")]
    argv += ["--set", f"checkpoint={stem}", "--set", "batch=1", "--set", "block_size=2"]
    argv += ["--set", "window=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "m.json") in err and re.search(message, err), err
